"""Reptile (Nichol, Achiam and Schulman, 2018).

Each task's contribution to the outer update is ``params - adapted``: the direction from the
adapted weights back to the initialisation, after ``inner_steps`` of plain SGD on all of the
task's examples. Given to the outer optimiser as a "gradient", a step of SGD with rate epsilon is
exactly Reptile's interpolation ``params += epsilon * (adapted - params)``.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from learners.base import Params
from learners.functional import SHARED_HEAD, gradient_steps
from learners.maml import MAML, HeadKnob
from pipelines.base import Task


class ReptileHyperparameters(HeadKnob):
    inner_lr: float = Field(0.01, gt=0, description="step size of the inner SGD")
    inner_steps: int = Field(5, ge=1, le=1000, description="inner SGD steps per task")


class Reptile(MAML):
    """Reptile: first-order, no query/support distinction during meta-training."""

    name = "reptile"
    Hyperparameters = ReptileHyperparameters
    search_space = {"inner_lr": {"low": 0.001, "high": 0.1, "log": True},
                    "outer_lr": {"low": 0.0003, "high": 0.003, "log": True}}
    first_order = True
    inner_checkpointing_refusal = ("is first order: its inner loop keeps no activations for the "
                                   "outer update")

    def task_gradient(self, params: Params, task: Task, *,
                      ways: int | None = None) -> tuple[Params, Tensor, Tensor]:
        x = torch.cat([task.support_x, task.query_x])
        y = torch.cat([task.support_y, task.query_y])
        meta = {k: v.detach() for k, v in params.items()}
        start = self.task_params(meta, self.ways_of(task.support_y, ways))
        # Statistics of the un-adapted model on the query set, for the training curves.
        outputs = self.predict(start, start, task.query_x).detach()
        loss = self.objective.loss(outputs, task.query_y)
        adapted = gradient_steps(self.support_loss, start, x, y, lr=self.hparams.inner_lr,
                                 steps=self.hparams.inner_steps, first_order=True)
        delta = {k: (start[k] - adapted[k]).detach() for k in meta if k != SHARED_HEAD}
        if SHARED_HEAD in meta:
            # Every class row started from the shared vector: move it toward their mean.
            delta[SHARED_HEAD] = (meta[SHARED_HEAD] - adapted["head.weight"].mean(dim=0)).detach()
        return delta, loss, outputs
