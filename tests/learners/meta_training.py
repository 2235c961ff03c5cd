"""The meta-training loop the learner tests share: Adam on a learner's meta-parameters over
consecutive batches of a task family's train split (its training batches: episodes, or labelled
minibatches for pretraining learners), running statistics moved as a moving average, as
MetaTrainer does it, without the trainer (so a test controls the learner, the optimiser's rate
and the batch path directly). Also ``random_episodes``: the seeded random input of the tests
that compare two gradient paths."""

from __future__ import annotations

import torch

from learners.base import Learner, Params
from pipelines.base import Task, TaskBatch, TaskFamily


def trainable(learner: Learner, seed: int = 0) -> Params:
    """The learner's initial meta-parameters as leaves that take gradients."""
    return {k: v.requires_grad_(True) for k, v in learner.init_params(seed).items()}


def meta_train(learner: Learner, family: TaskFamily, params: Params, *, iterations: int,
               meta_batch: int, lr: float, vectorize: bool = False) -> Params:
    """``iterations`` Adam steps of rate ``lr`` on ``params`` (in place), each on the mean
    meta-gradient of the next ``meta_batch`` training tasks; returns ``params``."""
    statistics = {k for k in params if learner.is_statistic(k)}
    optimizer = torch.optim.Adam([p for k, p in params.items() if k not in statistics], lr=lr)
    for iteration in range(iterations):
        batch = learner.training_batch(family, "train", 0, range(iteration * meta_batch,
                                                                 (iteration + 1) * meta_batch))
        gradient, _ = learner.batch_gradient(params, batch, vectorize=vectorize)
        for name, p in params.items():
            p.grad = gradient[name] / meta_batch
        optimizer.step()
        with torch.no_grad():
            for name in statistics:
                params[name] -= learner.statistics_momentum * params[name].grad
    return params


def random_episodes(count: int = 2) -> TaskBatch:
    """``count`` random 5-way 1-shot Omniglot-shaped episodes (3 queries per class), seeded: for
    tests that compare two gradient paths on the same input, not for learning."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(5)
    return TaskBatch.stack([Task(torch.rand(5, 1, 28, 28, generator=generator), labels,
                                 torch.rand(15, 1, 28, 28, generator=generator),
                                 labels.repeat_interleave(3)) for _ in range(count)])
