"""Meta-training throughput: in-process against 1 and 2 Ray workers, measured side by side.

    python benchmarks/scaling.py [--seconds 20] [--rounds 5] [--meta-batch 50] [--inner-steps 5]
    python benchmarks/scaling.py --checkpoints [--rounds 3]    # what trial checkpoints cost

Runs the same MAML sinusoid meta-training loop with ``workers.count`` 0 (in-process), 1 and 2 (one
torch thread each, Ray in-process) and prints tasks per second and the ratios to
in-process. In-process is measured twice: in a bare Python process (a spawned child that never
touches Ray) and inside a Ray task -- which is where a ``workers.count: 0`` trial of ``orch
launch`` runs. The settings take turns, ``--rounds`` rounds of ``seconds / rounds`` each, so that
a noisy or drifting machine (this one is a VM) weighs on every setting alike instead of on
whichever ran during a slow minute. The 1-worker overhead (an actor call per iteration, and the
actor's process) should stay under 10% of in-process.

``--checkpoints`` instead trains two whole trials -- the quickstart's MAML (sinusoid, 150
iterations) and examples/omniglot.yaml's Conv-4 MAML on the shared Omniglot zips (300 iterations)
-- with and without checkpoints at the default interval (every validation), in alternating
rounds, and prints the wall time of each, their ratio, and the time spent saving (which the
target, at most 2% of training time, is about: the wall-time ratio also carries the VM's noise).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import torch

import yaml

from orchestrator.services import cluster
from orchestrator.sweep import checkpoints
from orchestrator.services.cluster import RayFarm
from orchestrator.config import sweep_from_dict
from orchestrator.training.loop import LocalFarm, MetaTrainer, ShardWorker

REPO = Path(__file__).resolve().parents[1]
OMNIGLOT_ZIPS = [REPO.parent / "shared" / "data" / "omniglot" / f"images_background_small{i}.zip"
                 for i in (1, 2)]


def iteration_times(trainer: MetaTrainer, seconds: float, first: int) -> list[float]:
    """Seconds per meta-iteration for ``seconds``, after one warm-up iteration."""
    params = trainer.initial_params()
    trainer.meta_gradient(params, first)  # warm-up: first call builds caches in every worker
    times, started, iteration = [], time.perf_counter(), first + 1
    while time.perf_counter() - started < seconds:
        begun = time.perf_counter()
        trainer.meta_gradient(params, iteration)
        times.append(time.perf_counter() - begun)
        iteration += 1
    return times


def in_process_times(sweep: dict, knobs: dict, seconds: float, first: int) -> list[float]:
    """In-process iteration times (a LocalFarm) in whatever process calls it."""
    torch.set_num_threads(1)
    config = sweep_from_dict(sweep)
    return iteration_times(MetaTrainer(config, "maml", knobs, LocalFarm(
        ShardWorker(config.model_dump(), "maml", knobs))), seconds, first)


def trial_seconds(raw: dict, knobs: dict, store: Path | None) -> tuple[float, float, int]:
    """(wall seconds, seconds spent saving, checkpoints saved) of one whole in-process trial
    loop, with checkpoints into ``store`` at the sweep's default interval, or none."""
    where = {"checkpoint_storage": str(store)} if store is not None else {}
    sweep = sweep_from_dict({**raw, "training": {**raw.get("training", {}), **where}})
    trainer = MetaTrainer(sweep, "maml", knobs, LocalFarm(ShardWorker(sweep.model_dump(), "maml",
                                                                      knobs)))
    saver = None
    if store is not None:
        saver = checkpoints.TrialCheckpointer(
            checkpoints.TrialCheckpoints.of(sweep, "maml", 0, knobs), sweep.training)
    started = time.perf_counter()
    trainer.train(checkpointer=saver)
    wall = time.perf_counter() - started
    return wall, (saver.cost_s if saver else 0.0), (saver.saved if saver else 0)


def checkpoint_cost(rounds: int) -> None:
    """Whole trials with and without checkpoints, alternating, for the two workloads."""
    from pipelines.importers import import_omniglot

    torch.set_num_threads(1)
    workloads = []
    quickstart = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    workloads.append(("quickstart MAML (sinusoid, MLP 40-40)", quickstart,
                      {"inner_lr": 0.01, "inner_steps": 1, "outer_lr": 0.001}))
    with tempfile.TemporaryDirectory() as folder:
        if all(z.exists() for z in OMNIGLOT_ZIPS):
            import_omniglot(OMNIGLOT_ZIPS, Path(folder) / "omniglot")
            omniglot = yaml.safe_load((REPO / "examples" / "omniglot.yaml").read_text())
            omniglot["data"]["path"] = str(Path(folder) / "omniglot")
            workloads.append(("Omniglot MAML (Conv-4, 32 filters, 5-way 1-shot)", omniglot,
                              {"inner_lr": 0.4, "inner_steps": 1, "outer_lr": 0.002}))
        else:
            print(f"(no Omniglot row: {OMNIGLOT_ZIPS[0].parent} is missing)")
        print(f"Trial checkpoints at the default interval (every validation), in-process, 1 torch "
              f"thread, {rounds} alternating rounds; median wall seconds per trial")
        print(f"{'workload':<50}{'no ckpt':>9}{'ckpt':>9}{'ratio':>7}{'saves':>7}"
              f"{'ms/save':>9}{'saving share':>14}")
        for name, raw, knobs in workloads:
            raw = {**raw, "workers": {"count": 0}, "algorithms": {"maml": {}}}
            plain, saved, cost, count = [], [], [], 0
            for round_ in range(rounds):
                plain.append(trial_seconds(raw, knobs, None)[0])
                wall, spent, count = trial_seconds(raw, knobs, Path(folder) / f"store{round_}")
                saved.append(wall)
                cost.append(spent)
            base, with_ckpt = statistics.median(plain), statistics.median(saved)
            print(f"{name:<50}{base:>9.2f}{with_ckpt:>9.2f}{with_ckpt / base:>7.3f}{count:>7}"
                  f"{1000 * statistics.median(cost) / max(count, 1):>9.1f}"
                  f"{100 * statistics.median(cost) / with_ckpt:>13.2f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measuring time per setting")
    parser.add_argument("--rounds", type=int, default=5, help="turns each setting takes")
    parser.add_argument("--meta-batch", type=int, default=50)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--vectorize", choices=["on", "off"], default="off")
    parser.add_argument("--checkpoints", action="store_true",
                        help="measure what trial checkpoints cost instead (--rounds rounds)")
    args = parser.parse_args()
    if args.checkpoints:
        checkpoint_cost(args.rounds)
        return
    torch.set_num_threads(1)
    knobs = {"inner_lr": 0.01, "inner_steps": args.inner_steps}
    turn = args.seconds / args.rounds

    def config(count: int):
        return sweep_from_dict({"name": "scaling", "training": {"meta_batch": args.meta_batch,
                                                                "vectorize": args.vectorize},
                                "workers": {"count": count, "cpus": 0.5, "driver_cpus": 0.5},
                                "algorithms": {"maml": {}}})

    in_process = config(0).model_dump()
    times: dict[str, list[float]] = {"in-process": [], "in a Ray task": [], "1 worker": [],
                                     "2 workers": []}
    # A spawned child imports torch and orch but never Ray: the bare process a hand-written
    # script runs in. Started before Ray, so that it inherits none of Ray's state.
    bare = multiprocessing.get_context("spawn").Pool(1)
    # Ray in this process, as `orch launch` starts it (2 CPUs on this machine). Half a CPU per
    # process, so the Ray task and both farms' actors (1 + 2) are placed at once; only one
    # setting computes at a time, each with one torch thread.
    cluster.connect(None)
    try:
        # What ``workers.count: 0`` runs as under ``orch launch``: the trial's own process, a
        # Ray task in its placement group (``cluster.submit_trial``), not a bare Python process.
        alone = config(0).workers
        group = cluster.reserve(alone, "PACK")
        trainers = {}
        for count in (1, 2):
            sweep = config(count)
            trainers[count] = MetaTrainer(sweep, "maml", knobs,
                                          RayFarm(sweep.model_dump(), "maml", knobs, sweep.workers))
        for round_ in range(args.rounds):
            first = 1000 * round_  # fresh tasks each round, the same ones for every setting
            times["in-process"] += bare.apply(in_process_times, (in_process, knobs, turn, first))
            times["in a Ray task"] += cluster.result(cluster.submit_trial(
                in_process_times, group, alone, in_process, knobs, turn, first))
            times["1 worker"] += iteration_times(trainers[1], turn, first)
            times["2 workers"] += iteration_times(trainers[2], turn, first)
        for trainer in trainers.values():
            trainer.farm.shutdown()
        cluster.release(group)
    finally:
        bare.terminate()
    rates = {name: args.meta_batch * len(t) / sum(t) for name, t in times.items()}
    base = rates["in-process"]
    print(f"MAML sinusoid, meta-batch {args.meta_batch}, {args.inner_steps} inner steps, "
          f"vectorize {args.vectorize}, 1 torch thread per process, {args.seconds:g} s each in "
          f"{args.rounds} turns")
    print(f"{'setting':<14}{'tasks/s':>10}{'ratio':>8}{'median ms/iteration':>22}")
    for name, rate in rates.items():
        print(f"{name:<14}{rate:>10.1f}{rate / base:>8.2f}"
              f"{1000 * statistics.median(times[name]):>22.1f}")
    print(f"1-worker overhead: {100 * (1 - rates['1 worker'] / base):.1f}% of in-process in a bare "
          f"process (target < 10%); {100 * (1 - rates['1 worker'] / rates['in a Ray task']):.1f}% "
          "of in-process inside a Ray task, as a workers.count: 0 trial runs")


if __name__ == "__main__":
    main()
