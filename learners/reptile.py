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

from learners.base import Hyperparameters, Params
from learners.functional import gradient_steps
from learners.maml import MAML
from pipelines.base import Task


class ReptileHyperparameters(Hyperparameters):
    inner_lr: float = Field(0.01, gt=0, description="step size of the inner SGD")
    inner_steps: int = Field(5, ge=1, le=1000, description="inner SGD steps per task")


class Reptile(MAML):
    """Reptile: first-order, no query/support distinction during meta-training."""

    name = "reptile"
    Hyperparameters = ReptileHyperparameters
    first_order = True

    def task_gradient(self, params: Params, task: Task) -> tuple[Params, Tensor, Tensor]:
        x = torch.cat([task.support_x, task.query_x])
        y = torch.cat([task.support_y, task.query_y])
        start = {k: v.detach() for k, v in params.items()}
        # Statistics of the un-adapted model on the query set, for the training curves.
        outputs = self.predict(start, start, task.query_x).detach()
        loss = self.objective.loss(outputs, task.query_y)
        adapted = gradient_steps(self.support_loss, start, x, y, lr=self.hparams.inner_lr,
                                 steps=self.hparams.inner_steps, first_order=True)
        delta = {k: (start[k] - adapted[k]).detach() for k in start}
        return delta, loss, outputs
