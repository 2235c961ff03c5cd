"""Sinusoid regression, the task family of the MAML paper (Finn et al., 2017, section 5.1).

Each task is ``y = A sin(x - phase)`` with amplitude ``A ~ U[0.1, 5]``, phase ``~ U[0, pi]`` and
inputs ``x ~ U[-5, 5]``; K support points and separate query points are drawn per task.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pipelines.base import Task, TaskFamily, task_seed

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)


class Sinusoid(TaskFamily):
    """Sinusoid regression tasks; ``shots`` support and ``queries`` query points each."""

    kind = "regression"

    def __init__(self, *, shots: int = 10, queries: int = 10):
        if shots < 1 or queries < 1:
            raise ValueError("sinusoid tasks need shots >= 1 and queries >= 1")
        self.shots = shots
        self.queries = queries

    def task(self, split: str, seed: int, index: int, *, shots: int | None = None) -> Task:
        generator = torch.Generator().manual_seed(task_seed(seed, split, index))
        amplitude = _uniform(generator, *AMPLITUDE, ())
        phase = _uniform(generator, *PHASE, ())
        k = self.shots if shots is None else shots
        x = _uniform(generator, *X_RANGE, (k + self.queries, 1))
        y = amplitude * torch.sin(x - phase)
        return Task(x[:k], y[:k], x[k:], y[k:])

    @property
    def ways(self) -> None:
        return None

    def input_shape(self) -> tuple[int, ...]:
        return (1,)

    def output_size(self) -> int:
        return 1

    def fingerprint_spec(self) -> dict[str, Any]:
        return {"family": "sinusoid", "amplitude": AMPLITUDE, "phase": PHASE, "x": X_RANGE,
                "shots": self.shots, "queries": self.queries}


def _uniform(generator: torch.Generator, low: float, high: float, shape: tuple[int, ...]) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)
