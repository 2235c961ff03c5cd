"""Omniglot 5-way 1-shot on held-out alphabets after a fixed CPU budget: MAML and Prototypical Networks.

    python benchmarks/omniglot.py                  # quick look: 2 minutes of meta-training each
    python benchmarks/omniglot.py --minutes 10     # the reported figures (targets: ProtoNet >= 95%,
                                                   # MAML >= 85%)

It imports the two small Omniglot zips from shared/data/omniglot into a temporary folder (8
alphabets; one held out for validation, one for test), meta-trains each learner through the same
ShardWorker / LocalFarm / MetaTrainer a sweep trial uses until the budget is spent, then scores
5-way 1-shot episodes (15 queries per class) of the test alphabet: mean accuracy and the 95%
interval 1.96 * std / sqrt(n) over ``--episodes`` episodes. It also prints how fast episodes are
sampled beside the time of one MAML meta-step: sampling should cost under 5% of a step.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from orchestrator.config import Sweep
from orchestrator.training import LocalFarm, MetaTrainer, ShardWorker
from pipelines.episodes import EpisodeFamily
from pipelines.importers import import_omniglot

REPO = Path(__file__).resolve().parents[1]
ZIPS = ("images_background_small1.zip", "images_background_small2.zip")
TARGETS = {"protonet": 0.95, "maml": 0.85}
EVAL_SEED = 12345  # test episodes are the same for every learner and every run

# Meta-training settings per learner. MAML follows Finn et al. for Omniglot (one inner step of
# 0.4, three at test); ProtoNet follows Snell et al. in training with more ways than it is tested
# on. Both use Conv-4 and 90-degree rotations as extra training classes; MAML's filters, query
# counts and meta-batch are cut down (and its outer rate raised) so that a CPU budget buys enough
# meta-iterations.
SETTINGS: dict[str, dict[str, Any]] = {
    "protonet": {"ways": 20, "shots": 1, "queries": 5, "filters": 64, "meta_batch": 1,
                 "knobs": {"outer_lr": 0.001}, "test_steps": None},
    "maml": {"ways": 5, "shots": 1, "queries": 5, "filters": 32, "meta_batch": 4,
             "knobs": {"inner_lr": 0.4, "inner_steps": 1, "outer_lr": 0.003}, "test_steps": 3},
}


def sweep(algorithm: str, data: Path, *, ways: int, queries: int, filters: int, meta_batch: int,
          test_split: str | None = None) -> Sweep:
    return Sweep.model_validate({
        "name": f"bench-{algorithm}",
        "data": {"path": str(data), "ways": ways, "shots": 1, "queries": queries,
                 "augment_rotations": True, "train_split": "train",
                 "val_split": test_split or "val"},
        "model": {"backbone": "conv4", "filters": filters},
        "training": {"meta_batch": meta_batch, "iterations": 10**7, "eval_every": 10**7,
                     "eval_tasks": 20, "device": "cpu"},
        "workers": {"count": 0},
        "search": {"metric": "val_accuracy", "direction": "maximize"},
        "algorithms": {algorithm: {}},
    })


def run(algorithm: str, data: Path, *, minutes: float, episodes: int) -> dict[str, Any]:
    setting = SETTINGS[algorithm]
    knobs = dict(setting["knobs"])
    train_sweep = sweep(algorithm, data, ways=setting["ways"], queries=setting["queries"],
                        filters=setting["filters"], meta_batch=setting["meta_batch"])
    farm = LocalFarm(ShardWorker(train_sweep.model_dump(), algorithm, knobs))
    trainer = MetaTrainer(train_sweep, algorithm, knobs, farm)
    started = time.perf_counter()
    outcome = trainer.train(time_budget_s=minutes * 60)
    trained_s = time.perf_counter() - started
    iterations = outcome.evaluations[-1].iteration
    # A meta-step measured on its own, after training, at the training settings.
    step_started = time.perf_counter()
    for i in range(3):
        trainer.meta_gradient(outcome.params, iterations + i)
    step_s = (time.perf_counter() - step_started) / 3
    # Test: 5-way 1-shot, 15 queries per class, on the held-out test alphabet.
    test_sweep = sweep(algorithm, data, ways=5, queries=15, filters=setting["filters"],
                       meta_batch=setting["meta_batch"], test_split="test")
    tester = ShardWorker(test_sweep.model_dump(), algorithm, knobs)
    accuracies = [tester.evaluate(outcome.params, "test", EVAL_SEED, [i],
                                  steps=setting["test_steps"])[0]["accuracy"]
                  for i in range(episodes)]
    mean = statistics.fmean(accuracies)
    interval = 1.96 * statistics.pstdev(accuracies) / math.sqrt(len(accuracies))
    return {"algorithm": algorithm, "iterations": iterations,
            "tasks": iterations * setting["meta_batch"], "train_s": trained_s,
            "val_accuracy": outcome.final.get("val_accuracy", float("nan")),
            "accuracy": mean, "interval": interval, "meta_step_s": step_s,
            "meta_batch": setting["meta_batch"]}


def sampling_rate(data: Path, *, episodes: int = 500) -> float:
    """Episodes per second at the test setting (5-way 1-shot, 15 queries), rotations on."""
    family = EpisodeFamily(data, ways=5, shots=1, queries=15, rotate_splits=("train",))
    family.task("train", 0, 0)
    started = time.perf_counter()
    for i in range(episodes):
        family.task("train", 0, i)
    return episodes / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=2.0,
                        help="meta-training budget per learner, at most 10 (default 2)")
    parser.add_argument("--episodes", type=int, default=600, help="test episodes (default 600)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: leaves the other cores to others)")
    parser.add_argument("--only", choices=sorted(SETTINGS), action="append",
                        help="run only this learner (repeatable)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "omniglot",
                        help="folder holding the small Omniglot zips")
    args = parser.parse_args(argv)
    if not 0 < args.minutes <= 10:
        parser.error("--minutes must be in (0, 10]")
    torch.set_num_threads(args.threads)
    zips = [args.data / name for name in ZIPS]
    missing = [str(z) for z in zips if not z.exists()]
    if missing:
        parser.error(f"missing {', '.join(missing)}; pass --data FOLDER")
    print(f"# CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s); budget {args.minutes:g} min of meta-training per learner",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="orch-omniglot-") as tmp:
        data = Path(tmp) / "omniglot"
        manifest = import_omniglot(zips, data)
        splits = {s: ", ".join(info["alphabets"]) for s, info in manifest["splits"].items()}
        print(f"# imported {manifest['alphabets']} alphabets, {manifest['classes']} characters, "
              f"{manifest['images']} images; train: {splits['train']}; val: {splits['val']}; "
              f"test: {splits['test']}", flush=True)
        rate = sampling_rate(data)
        results = []
        for algorithm in args.only or ["protonet", "maml"]:
            setting = SETTINGS[algorithm]
            print(f"# {algorithm}: {setting['ways']}-way {setting['shots']}-shot "
                  f"{setting['queries']}-query training, Conv-4 with {setting['filters']} filters, "
                  f"meta-batch {setting['meta_batch']}, knobs {setting['knobs']}", flush=True)
            result = run(algorithm, data, minutes=args.minutes, episodes=args.episodes)
            results.append(result)
            target = TARGETS[algorithm]
            verdict = "meets" if result["accuracy"] >= target else "BELOW"
            print(f"{algorithm:9s} {result['iterations']:6d} iterations ({result['tasks']} tasks) in "
                  f"{result['train_s']:.0f} s; val ({setting['ways']}-way) "
                  f"{result['val_accuracy']:.3f}; test 5-way 1-shot "
                  f"{100 * result['accuracy']:.2f}% +- {100 * result['interval']:.2f} over "
                  f"{args.episodes} episodes ({verdict} target {100 * target:.0f}%)", flush=True)
        per_batch = None
        for result in results:
            if result["algorithm"] == "maml":
                per_batch = result["meta_batch"] / rate
                print(f"sampling: {rate:.0f} episodes/s (5-way 1-shot, 15 queries); one MAML "
                      f"meta-step (meta-batch {result['meta_batch']}) {1000 * result['meta_step_s']:.0f} "
                      f"ms, of which sampling its episodes {1000 * per_batch:.1f} ms = "
                      f"{100 * per_batch / result['meta_step_s']:.2f}%")
        if per_batch is None:
            print(f"sampling: {rate:.0f} episodes/s (5-way 1-shot, 15 queries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
