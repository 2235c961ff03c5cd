"""Meta-SGD (Li, Zhou, Chen and Li, 2017): MAML whose inner learning rate is learned per weight.

The meta-parameters are the backbone's initial weights and, for every weight tensor ``k``, a rate
tensor ``lr.k`` of the same shape; the outer gradient trains both. ``adapt`` takes ``inner_steps``
steps of ``w - lr.w * grad`` (elementwise; one step in the paper) and returns the fast weights.
With ``head: zero`` or ``shared`` the per-task head's rows are made per task, so its rates are one
row shared by every class (``lr.head.weight`` is ``[features]``, ``lr.head.bias`` a scalar).
Every rate starts at ``inner_lr``; the paper draws them at random in [0.005, 0.1] for regression.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from learners.base import Adapted, Params
from learners.functional import (HEAD_BIAS, HEAD_WEIGHT, SHARED_HEAD, entries, gradient_steps,
                                 without)
from learners.maml import MAML, HeadKnob

RATE = "lr."


class MetaSGDHyperparameters(HeadKnob):
    inner_lr: float = Field(0.01, gt=0, description="initial value of every learned per-weight "
                            "inner learning rate")
    inner_steps: int = Field(1, ge=1, le=100, description="inner gradient steps per task (the "
                             "paper: one)")


class MetaSGD(MAML):
    """Second-order MAML with a learned rate for every weight entry."""

    name = "metasgd"
    Hyperparameters = MetaSGDHyperparameters
    search_space = {"inner_lr": {"low": 0.01, "high": 0.5, "log": True},
                    "outer_lr": {"low": 0.0003, "high": 0.003, "log": True}}
    inner_checkpointing_refusal = None

    def initial_params(self, generator: torch.Generator) -> Params:
        weights = super().initial_params(generator)
        rates = {RATE + k: torch.full_like(v, self.hparams.inner_lr)
                 for k, v in weights.items() if k != SHARED_HEAD}
        if self.hparams.head != "fixed":
            # The head is made per task with as many rows as the task has classes: one rate row
            # (and one bias rate) serves all of them.
            features = self.backbone.feature_size
            reference = next(iter(weights.values()))
            rates[RATE + HEAD_WEIGHT] = reference.new_full((features,), self.hparams.inner_lr)
            rates[RATE + HEAD_BIAS] = reference.new_full((), self.hparams.inner_lr)
        return {**weights, **rates}

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor, *,
              ways: int | None = None, steps: int | None = None) -> Adapted:
        start = self.task_params(without(params, RATE), self.ways_of(support_y, ways))
        return gradient_steps(self.support_loss, start, support_x, support_y, lr=entries(params, RATE),
                              steps=self.hparams.inner_steps if steps is None else steps,
                              first_order=self.first_order,
                              recompute_every=self.inner_checkpointing)
