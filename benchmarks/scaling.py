"""Meta-training throughput: in-process against 1 and 2 Ray workers, measured side by side.

    python benchmarks/scaling.py [--seconds 20] [--meta-batch 50] [--inner-steps 5]

Runs the same MAML sinusoid meta-training loop with ``workers.count`` 0 (in-process), 1 and 2 (one
torch thread each, Ray in-process with 2 CPUs) for the same number of seconds each, and prints
tasks per second and the ratios to in-process from this one run. In-process is measured twice:
in this bare Python process, and inside a Ray task -- which is where a ``workers.count: 0``
trial of ``orch launch`` runs, and where the same loop already runs about 5% slower than in a
bare process. The 1-worker overhead (an actor call per iteration, and the actor's process) should
stay under 10% of in-process.
"""

from __future__ import annotations

import argparse
import time

import ray
import torch

from orchestrator.cluster import RayFarm
from orchestrator.config import sweep_from_dict
from orchestrator.training import LocalFarm, MetaTrainer, ShardWorker


def measure(trainer: MetaTrainer, seconds: float) -> float:
    params = trainer.initial_params()
    trainer.meta_gradient(params, 0)  # warm-up: first call builds caches in every worker
    started, iteration = time.perf_counter(), 1
    while time.perf_counter() - started < seconds:
        trainer.meta_gradient(params, iteration)
        iteration += 1
    return (iteration - 1) * trainer.meta_batch / (time.perf_counter() - started)


def in_process_rate(sweep: dict, knobs: dict, seconds: float) -> float:
    """In-process tasks/s (a LocalFarm) in whatever process calls it."""
    torch.set_num_threads(1)
    config = sweep_from_dict(sweep)
    return measure(MetaTrainer(config, "maml", knobs, LocalFarm(
        ShardWorker(config.model_dump(), "maml", knobs))), seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measuring time per setting")
    parser.add_argument("--meta-batch", type=int, default=50)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--vectorize", choices=["on", "off"], default="off")
    args = parser.parse_args()
    torch.set_num_threads(1)
    knobs = {"inner_lr": 0.01, "inner_steps": args.inner_steps}

    def config(count: int):
        return sweep_from_dict({"name": "scaling", "training": {"meta_batch": args.meta_batch,
                                                                "vectorize": args.vectorize},
                                "workers": {"count": count, "cpus": 1}, "algorithms": {"maml": {}}})

    results = {}
    in_process = config(0)
    results["in-process"] = in_process_rate(in_process.model_dump(), knobs, args.seconds)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # What ``workers.count: 0`` runs as under ``orch launch``: the trial's own process, which
        # is a Ray worker (``cluster.submit_trial``), not a bare Python process.
        results["in a Ray task"] = ray.get(ray.remote(num_cpus=1)(in_process_rate).remote(
            in_process.model_dump(), knobs, args.seconds))
        for count in (1, 2):
            sweep = config(count)
            farm = RayFarm(sweep.model_dump(), "maml", knobs, sweep.workers)
            results[f"{count} worker{'s' if count > 1 else ''}"] = measure(
                MetaTrainer(sweep, "maml", knobs, farm), args.seconds)
            farm.shutdown()
    finally:
        ray.shutdown()
    base = results["in-process"]
    print(f"MAML sinusoid, meta-batch {args.meta_batch}, {args.inner_steps} inner steps, "
          f"vectorize {args.vectorize}, 1 torch thread per process, {args.seconds:g} s each")
    print(f"{'setting':<12}{'tasks/s':>10}{'ratio to in-process':>22}")
    for name, rate in results.items():
        print(f"{name:<12}{rate:>10.1f}{rate / base:>22.2f}")
    print(f"1-worker overhead: {100 * (1 - results['1 worker'] / base):.1f}% of in-process "
          f"(target < 10%); {100 * (1 - results['1 worker'] / results['in a Ray task']):.1f}% "
          "of in-process inside a Ray task, as a workers.count: 0 trial runs")


if __name__ == "__main__":
    main()
