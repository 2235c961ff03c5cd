"""Meta-training throughput by device and by batching: CPU against CUDA, per-task loop against
torch.func.vmap, measured side by side in one run (and, with Ray and a GPU, one Ray worker that
was given ``gpus: 1`` training on CUDA).

    python benchmarks/vectorize.py [--seconds 10] [--omniglot DIR_OR_ZIPS...]

Backs the ``training.vectorize: auto`` default: vmap is used where this measures it faster.
MAML, one inner step: sinusoid with the MLP (meta-batch 25), and 5-way 1-shot Omniglot with
Conv-4 (meta-batch 32) when ``--omniglot`` names the shared zips or an import.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from orchestrator.config import sweep_from_dict
from orchestrator.training.loop import LocalFarm, MetaTrainer, ShardWorker


def measure(trainer: MetaTrainer, seconds: float, device: str) -> float:
    """Meta-gradient throughput after one warm-up iteration (CUDA context, caches)."""
    params = trainer.initial_params()
    trainer.meta_gradient(params, 0)
    if device == "cuda":
        torch.cuda.synchronize()
    started, iteration = time.perf_counter(), 1
    while time.perf_counter() - started < seconds:
        trainer.meta_gradient(params, iteration)
        iteration += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return (iteration - 1) * trainer.meta_batch / (time.perf_counter() - started)


def rate(config: dict, knobs: dict, device: str, seconds: float) -> float:
    sweep = sweep_from_dict(config)
    farm = LocalFarm(ShardWorker(sweep.model_dump(), "maml", knobs, device=device))
    return measure(MetaTrainer(sweep, "maml", knobs, farm), seconds, device)


def workloads(omniglot: Path | None) -> dict[str, tuple[dict, dict]]:
    found = {"sinusoid MLP": ({"name": "v", "training": {"meta_batch": 25}, "algorithms": {"maml": {}}},
                              {"inner_lr": 0.01, "inner_steps": 1})}
    if omniglot is not None:
        found["omniglot Conv-4"] = (
            {"name": "v", "data": {"path": str(omniglot), "ways": 5, "shots": 1, "queries": 15},
             "model": {"backbone": "conv4", "filters": 64}, "training": {"meta_batch": 32},
             "algorithms": {"maml": {}}}, {"inner_lr": 0.4, "inner_steps": 1})
    return found


def prepare_omniglot(sources: list[str]) -> Path | None:
    if not sources:
        return None
    if len(sources) == 1 and (Path(sources[0]) / "manifest.json").exists():
        return Path(sources[0])
    from pipelines.importers import import_omniglot

    out = Path(tempfile.mkdtemp()) / "omniglot"
    import_omniglot([Path(s) for s in sources], out, size=28)
    return out


def ray_worker_on_gpu(config: dict, knobs: dict, seconds: float, in_process: float) -> None:
    """The same workload on one Ray worker given ``gpus: 1``: where it runs, and its rate."""
    try:
        from orchestrator.services import cluster
    except ImportError as error:  # a GPU machine with torch but no Ray
        print(f"Ray worker on GPU: skipped ({error})")
        return
    cluster.connect(None)  # Ray in this process, as orch launch starts it: it finds the GPU
    sweep = sweep_from_dict({**config, "workers": {"count": 1, "cpus": 1, "gpus": 1}})
    cluster.check_fits(sweep.workers)
    farm = cluster.RayFarm(sweep.model_dump(), "maml", knobs, sweep.workers)
    try:
        rate_on_ray = measure(MetaTrainer(sweep, "maml", knobs, farm), seconds, "cpu")
        print(f"Ray worker with gpus: 1 ran on {farm.devices()}: {rate_on_ray:.1f} tasks/s, "
              f"{rate_on_ray / in_process:.2f}x the in-process GPU rate")
    finally:
        farm.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--omniglot", nargs="*", default=[], help="Omniglot zips, or an orch import")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in devices:
        print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print(f"{'workload':<18}{'device':<7}{'loop tasks/s':>14}{'vmap tasks/s':>14}{'vmap/loop':>11}")
    results = {}
    found = workloads(prepare_omniglot(args.omniglot))
    for name, (config, knobs) in found.items():
        for device in devices:
            loop = rate({**config, "training": {**config["training"], "vectorize": "off"}}, knobs, device, args.seconds)
            vmap = rate({**config, "training": {**config["training"], "vectorize": "on"}}, knobs, device, args.seconds)
            results[name, device] = max(loop, vmap)
            print(f"{name:<18}{device:<7}{loop:>14.1f}{vmap:>14.1f}{vmap / loop:>11.2f}")
    for name in {n for n, _ in results}:
        if (name, "cuda") in results:
            print(f"{name}: best GPU / best CPU = {results[name, 'cuda'] / results[name, 'cpu']:.1f}x")
    if "cuda" in devices:
        name = "omniglot Conv-4" if "omniglot Conv-4" in found else "sinusoid MLP"
        config, knobs = found[name]
        print(f"{name} on a Ray worker:")
        ray_worker_on_gpu(config, knobs, args.seconds, results[name, "cuda"])


if __name__ == "__main__":
    main()
