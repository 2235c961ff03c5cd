"""Meta-training throughput: in-process against 1 and 2 Ray workers, measured side by side.

    python benchmarks/scaling.py [--seconds 20] [--rounds 5] [--meta-batch 50] [--inner-steps 5]

Runs the same MAML sinusoid meta-training loop with ``workers.count`` 0 (in-process), 1 and 2 (one
torch thread each, Ray in-process) and prints tasks per second and the ratios to
in-process. In-process is measured twice: in a bare Python process (a spawned child that never
touches Ray) and inside a Ray task -- which is where a ``workers.count: 0`` trial of ``orch
launch`` runs. The settings take turns, ``--rounds`` rounds of ``seconds / rounds`` each, so that
a noisy or drifting machine (this one is a VM) weighs on every setting alike instead of on
whichever ran during a slow minute. The 1-worker overhead (an actor call per iteration, and the
actor's process) should stay under 10% of in-process.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time

import ray
import torch

from orchestrator.cluster import RayFarm
from orchestrator.config import sweep_from_dict
from orchestrator.training import LocalFarm, MetaTrainer, ShardWorker


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measuring time per setting")
    parser.add_argument("--rounds", type=int, default=5, help="turns each setting takes")
    parser.add_argument("--meta-batch", type=int, default=50)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--vectorize", choices=["on", "off"], default="off")
    args = parser.parse_args()
    torch.set_num_threads(1)
    knobs = {"inner_lr": 0.01, "inner_steps": args.inner_steps}
    turn = args.seconds / args.rounds

    def config(count: int):
        return sweep_from_dict({"name": "scaling", "training": {"meta_batch": args.meta_batch,
                                                                "vectorize": args.vectorize},
                                "workers": {"count": count, "cpus": 1}, "algorithms": {"maml": {}}})

    in_process = config(0).model_dump()
    times: dict[str, list[float]] = {"in-process": [], "in a Ray task": [], "1 worker": [],
                                     "2 workers": []}
    # A spawned child imports torch and orch but never Ray: the bare process a hand-written
    # script runs in. Started before Ray, so that it inherits none of Ray's state.
    bare = multiprocessing.get_context("spawn").Pool(1)
    # 4 logical CPUs on this 2-core machine: the Ray task (1) and both farms' actors (1 + 2) are
    # alive at once, but only one setting computes at a time.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        # What ``workers.count: 0`` runs as under ``orch launch``: the trial's own process, which
        # is a Ray worker (``cluster.submit_trial``), not a bare Python process.
        in_ray_task = ray.remote(num_cpus=1)(in_process_times)
        trainers = {}
        for count in (1, 2):
            sweep = config(count)
            trainers[count] = MetaTrainer(sweep, "maml", knobs,
                                          RayFarm(sweep.model_dump(), "maml", knobs, sweep.workers))
        for round_ in range(args.rounds):
            first = 1000 * round_  # fresh tasks each round, the same ones for every setting
            times["in-process"] += bare.apply(in_process_times, (in_process, knobs, turn, first))
            times["in a Ray task"] += ray.get(in_ray_task.remote(in_process, knobs, turn, first))
            times["1 worker"] += iteration_times(trainers[1], turn, first)
            times["2 workers"] += iteration_times(trainers[2], turn, first)
        for trainer in trainers.values():
            trainer.farm.shutdown()
    finally:
        ray.shutdown()
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
