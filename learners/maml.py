"""Model-Agnostic Meta-Learning (Finn, Abbeel and Levine, 2017), second order.

The meta-parameters are the backbone's initial weights. ``adapt`` takes ``inner_steps`` steps of
gradient descent on the support loss; the outer gradient differentiates through every step.
With ``head: zero`` or ``head: shared`` the N-way output layer is made per task (Ye and Chao
2022), so a model trained 5-way also serves 20-way tasks.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
import torch
from torch import Tensor

from learners.backbones import call
from learners.base import Adapted, Hyperparameters, Learner, Objective, Params
from learners.functional import gradient_steps, meta_head, task_head


class HeadKnob(Hyperparameters):
    """The output head knob every learner of the gradient family shares."""

    head: Literal["fixed", "zero", "shared"] = Field(
        "fixed", description="classification head: 'fixed' N-way layer (serves at most the "
        "trained ways), 'zero' (a zero head per task) or 'shared' (one learned vector every "
        "class row starts from); the last two serve any number of classes")


class MAMLHyperparameters(HeadKnob):
    inner_lr: float = Field(0.01, gt=0, description="step size of the inner (task) gradient descent")
    inner_steps: int = Field(1, ge=1, le=100, description="inner gradient steps per task")


class MAML(Learner):
    """Second-order MAML: the outer gradient flows through the inner loop's gradients."""

    name = "maml"
    family = "gradient"
    Hyperparameters = MAMLHyperparameters
    first_order = False
    search_space = {"inner_lr": {"low": 0.01, "high": 0.5, "log": True},
                    "outer_lr": {"low": 0.0003, "high": 0.003, "log": True}}
    inner_checkpointing_refusal = None

    def __init__(self, backbone, objective: Objective, hparams: MAMLHyperparameters):
        super().__init__(backbone, objective, hparams)
        if hparams.head != "fixed" and not objective.classification:
            raise ValueError(f"head: {hparams.head} is for classification; regression keeps "
                             "the fixed output layer")

    def initial_params(self, generator: torch.Generator) -> Params:
        return meta_head(super().initial_params(generator), self.hparams.head)

    def task_params(self, params: Params, ways: int | None) -> Params:
        """The weights a task's inner loop starts from (the meta-parameters, with its head)."""
        return task_head(params, self.hparams.head, ways=ways,
                         features=self.backbone.feature_size)

    def support_loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return self.objective.loss(call(self.backbone, params, x), y)

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor, *,
              ways: int | None = None, steps: int | None = None) -> Adapted:
        start = self.task_params(params, self.ways_of(support_y, ways))
        return gradient_steps(self.support_loss, start, support_x,
                              support_y, lr=self.hparams.inner_lr,
                              steps=self.hparams.inner_steps if steps is None else steps,
                              first_order=self.first_order,
                              recompute_every=self.inner_checkpointing)

    def predict(self, params: Params, adapted: Adapted, query_x: Tensor) -> Tensor:
        return call(self.backbone, adapted, query_x)
