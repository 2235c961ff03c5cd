"""Transductive inference against the inductive result on the same Omniglot episodes.

    python benchmarks/transductive.py                    # ProtoNet trained 3 CPU minutes
    python benchmarks/transductive.py --minutes 10 --jobs 2

It imports the two small Omniglot zips from shared/data/omniglot into a temporary folder (as
benchmarks/omniglot.py does, the same held-out alphabet for test), trains that benchmark's
``simpleshot`` row (Chen et al.'s recipe: 4,500 minibatches of 16) and ``protonet`` row
(20-way episodes, for ``--minutes`` CPU minutes), then scores each on the same ``--episodes``
test episodes of three settings -- 5-way 1-shot and 5-way 5-shot with 15 queries per class,
and Meta-Dataset-style variable-way episodes (pipelines/variable_episodes.py) -- one query at a
time (the learner's own classifier) and with each transductive method at the papers' default
knobs (learners/transduction.py). Every method sees the same embeddings of the same episodes
as the inductive classifier; it prints the mean accuracy with its 95% interval and the paired
difference to the inductive result with the difference's interval (1.96 std / sqrt(n)).
Episodes of one shape are solved together (``torch.vmap``, TIM-GD only: its 1000 Adam steps
are the cost); the others one at a time.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from learners.transduction import METHODS
from omniglot import EVAL_SEED, REPO, SETTINGS, ZIPS, sweep
from orchestrator.models.inference import interval95
from orchestrator.training.loop import LocalFarm, MetaTrainer, ShardWorker
from pipelines.episodes import EpisodeFamily
from pipelines.importers import import_omniglot
from pipelines.variable_episodes import VariableEpisodes

BACKBONES = ("simpleshot", "protonet")
EPISODES = {"5-way 1-shot": dict(ways=5, shots=1, queries=15),
            "5-way 5-shot": dict(ways=5, shots=5, queries=15),
            "variable-way": None}
# Each method's published figure, for orientation: its data set and backbone, and the
# inductive figure it is set beside. From the authors' READMEs (mboudiaf/TIM,
# imtiazziko/LaplacianShot, yhu01/PT-MAP), whose tables reproduce the papers'.
PAPERS = {
    "tim": "mini-ImageNet, ResNet-18: 73.9 / 85.0 (1 / 5 shots); WRN-28-10: 77.8 / 87.4 "
           "against SimpleShot's 65.87 / 82.09 on a WRN",
    "bdcspn": "mini-ImageNet, WRN-28-10: 70.31 / 81.89, against SimpleShot's 65.87 / 82.09 "
              "(another WRN)",
    "laplacianshot": "mini-ImageNet, WRN: 74.86 / 84.13 against SimpleShot's 65.87 / 82.09 "
                     "(+9.0 / +2.0); CUB, ResNet-18: 80.96 / 88.68 against 70.28 / 86.37",
    "ptmap": "mini-ImageNet, WRN trained with S2M2_R: 82.92 / 88.82; SimpleShot's WRN: "
             "65.87 / 82.09",
}


def train(row: str, data: Path, minutes: float) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The benchmarks/omniglot.py row ``row`` meta-trained (pretrained) for the budget."""
    torch.set_num_threads(1)
    setting = SETTINGS[row]
    knobs = dict(setting.knobs)
    config = sweep(row, data, setting, ways=setting.ways, queries=setting.queries)
    trainer = MetaTrainer(config, row, knobs,
                          LocalFarm(ShardWorker(config.model_dump(), row, knobs)))
    started = time.process_time()
    outcome = trainer.train(time_budget_s=minutes * 60)
    return ({"row": row, "iterations": outcome.evaluations[-1].iteration,
             "cpu_s": time.process_time() - started}, outcome.params)


def score(row: str, data: Path, params: dict[str, torch.Tensor], name: str,
          episodes: int) -> dict[str, Any]:
    """One backbone on one setting's episodes: inductive and every method, per episode."""
    torch.set_num_threads(1)
    setting = SETTINGS[row]
    shape = EPISODES[name]
    family = (VariableEpisodes(str(data)) if shape is None
              else EpisodeFamily(data, **shape))
    config = sweep(row, data, setting, ways=5, queries=15, test_split="test")
    learner = ShardWorker(config.model_dump(), row, dict(setting.knobs)).learner
    tasks = [family.task("test", EVAL_SEED, i) for i in range(episodes)]
    started = time.perf_counter()
    correct: dict[str, list[float]] = {"inductive": []}
    features = []
    with torch.no_grad():
        for task in tasks:
            outputs = learner.adapted_outputs(params, task.support_x, task.support_y,
                                              task.query_x)
            correct["inductive"].append(float((outputs.argmax(-1) == task.query_y)
                                              .float().mean()))
            features.append((learner.embedding(params, task.support_x),
                             learner.embedding(params, task.query_x)))
    seconds = {"inductive": time.perf_counter() - started}
    centre = learner.feature_mean(params)
    for method_name, method in METHODS.items():
        knobs = method.Knobs()
        started = time.perf_counter()
        if shape is not None and method_name == "tim":  # one shape: all episodes at once
            support_y, ways = tasks[0].support_y, shape["ways"]
            log_probs = torch.vmap(lambda s, q: method.on_features(
                s, support_y, q, ways, knobs, centre=centre).log_probs)(
                torch.stack([s for s, _ in features]), torch.stack([q for _, q in features]))
        else:
            log_probs = [method.on_features(s, task.support_y, q, int(task.support_y.max()) + 1,
                                            knobs, centre=centre).log_probs
                         for (s, q), task in zip(features, tasks)]
        correct[method_name] = [float((answer.argmax(-1) == task.query_y).float().mean())
                                for answer, task in zip(log_probs, tasks)]
        seconds[method_name] = time.perf_counter() - started
    ways = [int(task.support_y.max()) + 1 for task in tasks]
    supports = [len(task.support_y) for task in tasks]
    return {"row": row, "setting": name, "correct": correct, "seconds": seconds,
            "ways": (min(ways), float(np.mean(ways)), max(ways)),
            "support": (min(supports), float(np.mean(supports)), max(supports))}


def report(result: dict[str, Any]) -> list[str]:
    correct = result["correct"]
    base = np.asarray(correct["inductive"])
    lines = [f"{result['row']:10s} {result['setting']:12s} inductive      "
             f"{100 * base.mean():6.2f} +- {100 * interval95(base):.2f}"
             f"  [{len(base)} episodes, {result['seconds']['inductive']:.0f} s]"]
    for name in METHODS:
        scores = np.asarray(correct[name])
        difference = scores - base
        lines.append(f"{result['row']:10s} {result['setting']:12s} {name:14s} "
                     f"{100 * scores.mean():6.2f} +- {100 * interval95(scores):.2f}   "
                     f"{100 * difference.mean():+6.2f} +- {100 * interval95(difference):.2f} "
                     f"vs inductive  [{result['seconds'][name]:.0f} s]")
    if result["setting"] == "variable-way":
        lines.append(f"{'':23s} ways min/mean/max {result['ways'][0]}/{result['ways'][1]:.1f}/"
                     f"{result['ways'][2]}, support set {result['support'][0]}/"
                     f"{result['support'][1]:.1f}/{result['support'][2]}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0,
                        help="ProtoNet's training budget in CPU minutes (default 3); SimpleShot "
                             "stops at its recipe's 4,500 minibatches within the same budget")
    parser.add_argument("--episodes", type=int, default=600,
                        help="test episodes per setting (default 600)")
    parser.add_argument("--jobs", type=int, default=1, help="processes at once (default 1)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "omniglot",
                        help="folder holding the small Omniglot zips")
    args = parser.parse_args(argv)
    zips = [args.data / name for name in ZIPS]
    if any(not z.exists() for z in zips):
        parser.error(f"missing Omniglot zips in {args.data}; pass --data FOLDER")
    print(f"# CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, one "
          f"thread per process, {args.jobs} at once; ProtoNet {args.minutes:g} CPU min; "
          f"{args.episodes} test episodes per setting", flush=True)
    with tempfile.TemporaryDirectory(prefix="orch-transductive-") as tmp:
        data = Path(tmp) / "omniglot"
        import_omniglot(zips, data)
        with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            trained = {}
            for info, params in pool.map(train, BACKBONES, [data] * 2, [args.minutes] * 2):
                trained[info["row"]] = params
                print(f"# {info['row']}: {info['iterations']} iterations, "
                      f"{info['cpu_s']:.0f} CPU s", flush=True)
            jobs = [(row, name) for row in BACKBONES for name in EPISODES]
            futures = [pool.submit(score, row, data, trained[row], name, args.episodes)
                       for row, name in jobs]
            for future in futures:
                for line in report(future.result()):
                    print(line, flush=True)
    for name, paper in PAPERS.items():
        print(f"# paper: {METHODS[name].title}: {paper}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
