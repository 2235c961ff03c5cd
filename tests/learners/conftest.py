"""Fixtures of the learner tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest


@pytest.fixture
def omniglot_accuracy(omniglot_dir: Path) -> Callable[..., tuple[float, dict, Any]]:
    """A function that meta-trains a learner briefly on the small Omniglot set through the trial
    path (ShardWorker, LocalFarm, MetaTrainer; Conv-4 with 8 filters, 5-way 1-shot) and returns
    its mean accuracy on the held-out test alphabet, with the trained weights and the trainer."""
    from orchestrator.config import Sweep
    from orchestrator.training.loop import LocalFarm, MetaTrainer, ShardWorker

    def accuracy(algorithm: str, knobs: dict, *, iterations: int = 60, meta_batch: int = 2,
                 tests: int = 50, steps: int | None = None) -> tuple[float, dict, Any]:
        sweep = Sweep.model_validate({
            "name": f"test-{algorithm}",
            "data": {"path": str(omniglot_dir), "ways": 5, "shots": 1, "queries": 5,
                     "train_split": "train", "val_split": "test"},
            "model": {"backbone": "conv4", "filters": 8},
            "training": {"meta_batch": meta_batch, "iterations": iterations,
                         "eval_every": iterations, "eval_tasks": tests, "device": "cpu"},
            "workers": {"count": 0}, "algorithms": {algorithm: {}}})
        # 0.01 rather than 0.005: at 0.005, 1 or 2 of training seeds 0-11 of MAML++, Meta-SGD
        # and ANIL each ended below 0.4 (0.36-0.40); at 0.01 none below 0.42.
        knobs = {"outer_lr": 0.01, **knobs}
        trainer = MetaTrainer(sweep, algorithm, knobs,
                              LocalFarm(ShardWorker(sweep.model_dump(), algorithm, knobs)))
        params = trainer.train().params
        return trainer.validate(params, steps=steps)["val_accuracy"], params, trainer

    return accuracy
