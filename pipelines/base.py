"""What a task family is: a seeded source of few-shot tasks, addressed by (split, seed, index).

Addressing tasks by index rather than handing tensors around is what lets a Ray worker sample its
own shard of a meta-batch: the driver sends a handful of integers, never images.
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Task:
    """One few-shot task: a support set to adapt on and a query set to score the adaptation.

    Regression: ``*_x`` is ``[n, in_features]``, ``*_y`` is ``[n, out_features]`` (float).
    Classification: ``*_x`` is ``[n, C, H, W]``, ``*_y`` is ``[n]`` with labels ``0..ways-1``.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def to(self, device: torch.device | str) -> "Task":
        return Task(*(t.to(device, non_blocking=True) for t in
                      (self.support_x, self.support_y, self.query_x, self.query_y)))


@dataclass(frozen=True)
class TaskBatch:
    """Tasks stacked along a leading dimension: ``support_x`` is ``[tasks, N*K, ...]``."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    @staticmethod
    def stack(tasks: Sequence[Task]) -> "TaskBatch":
        return TaskBatch(
            torch.stack([t.support_x for t in tasks]),
            torch.stack([t.support_y for t in tasks]),
            torch.stack([t.query_x for t in tasks]),
            torch.stack([t.query_y for t in tasks]),
        )

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def to(self, device: torch.device | str) -> "TaskBatch":
        return TaskBatch(*(t.to(device, non_blocking=True) for t in
                           (self.support_x, self.support_y, self.query_x, self.query_y)))

    def __getitem__(self, i: int) -> Task:
        return Task(self.support_x[i], self.support_y[i], self.query_x[i], self.query_y[i])


@dataclass(frozen=True)
class TaskList:
    """Tasks of different shapes -- variable-way, variable-shot episodes -- which cannot be
    stacked: the trainer adapts to them one at a time."""

    tasks: tuple[Task, ...]

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, i: int) -> Task:
        return self.tasks[i]

    def to(self, device: torch.device | str) -> "TaskList":
        return TaskList(tuple(task.to(device) for task in self.tasks))

    def singles(self) -> list[TaskBatch]:
        """Each task as a batch of one (what ``Learner.batch_gradient`` takes)."""
        return [TaskBatch.stack([task]) for task in self.tasks]


@dataclass(frozen=True)
class Minibatches:
    """Shards of labelled examples for pretraining a classifier over every class of a split:
    ``x`` is ``[shards, size, ...]``, ``y`` is ``[shards, size]`` with labels ``0..classes-1``.
    A shard is the unit a worker computes and BatchNorm normalises over, as a task is for
    episodic learners."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device: torch.device | str) -> "Minibatches":
        return Minibatches(self.x.to(device, non_blocking=True), self.y.to(device, non_blocking=True))


def task_seed(seed: int, split: str, index: int) -> int:
    """A 63-bit seed for task ``index`` of ``split`` under ``seed``, stable across processes.

    Python's ``hash`` is salted per process, so it cannot be used: two Ray workers must derive the
    same task from the same three values.
    """
    digest = hashlib.blake2b(f"{seed}/{split}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class TaskFamily(abc.ABC):
    """A distribution over tasks; ``task(split, seed, index)`` is a pure function of its arguments."""

    # "regression" or "classification": decides the learner's loss and the reported metrics.
    kind: ClassVar[str]

    @abc.abstractmethod
    def task(self, split: str, seed: int, index: int, *, shots: int | None = None) -> Task:
        """Task ``index`` of ``split`` for ``seed``; ``shots`` overrides the configured K."""

    def batch(self, split: str, seed: int, indices: Sequence[int], *,
              shots: int | None = None) -> TaskBatch | TaskList:
        """Tasks ``indices``, stacked; a ``TaskList`` where tasks differ in shape
        (``fixed_shape``)."""
        tasks = [self.task(split, seed, i, shots=shots) for i in indices]
        return TaskBatch.stack(tasks) if self.fixed_shape else TaskList(tuple(tasks))

    @property
    def fixed_shape(self) -> bool:
        """Whether every task has the same shape (False for variable-way episodes)."""
        return True

    @property
    @abc.abstractmethod
    def ways(self) -> int | None:
        """Classes per task for classification, None for regression."""

    @abc.abstractmethod
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input example, used to build the backbone."""

    @abc.abstractmethod
    def output_size(self) -> int:
        """Width of the backbone's output layer."""

    @abc.abstractmethod
    def fingerprint_spec(self) -> dict[str, Any]:
        """Everything that defines the task distribution, with the data's content digest and
        never a path: ``orch compare`` records it with the episodes it scores. (The registry's
        champion fingerprint, ``Sweep.task_fingerprint``, hashes the same content digests.)"""

    def preprocessing(self) -> dict[str, Any]:
        """How raw inputs were turned into tensors; saved with every model trained on it."""
        return {}

    def class_count(self, split: str) -> int | None:
        """How many classes a classifier pretrained on ``split`` tells apart (``minibatches``'
        labels); None for families without labelled classes (regression)."""
        return None

    def minibatches(self, split: str, seed: int, indices: Sequence[int], *,
                    size: int) -> Minibatches:
        """Minibatch shards ``indices`` of ``size`` labelled examples each, over every class of
        ``split``: what pretraining learners train on. A pure function of its arguments."""
        raise TypeError(f"{type(self).__name__} has no labelled classes to pretrain a "
                        "classifier on")
