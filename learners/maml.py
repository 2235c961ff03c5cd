"""Model-Agnostic Meta-Learning (Finn, Abbeel and Levine, 2017), second order.

The meta-parameters are the backbone's initial weights. ``adapt`` takes ``inner_steps`` steps of
gradient descent on the support loss; the outer gradient differentiates through every step.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from learners.backbones import call
from learners.base import Adapted, Hyperparameters, Learner, Params
from learners.functional import gradient_steps


class MAMLHyperparameters(Hyperparameters):
    inner_lr: float = Field(0.01, gt=0, description="step size of the inner (task) gradient descent")
    inner_steps: int = Field(1, ge=1, le=100, description="inner gradient steps per task")


class MAML(Learner):
    """Second-order MAML: the outer gradient flows through the inner loop's gradients."""

    name = "maml"
    Hyperparameters = MAMLHyperparameters
    first_order = False

    def support_loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return self.objective.loss(call(self.backbone, params, x), y)

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor, *,
              steps: int | None = None) -> Adapted:
        return gradient_steps(self.support_loss, params, support_x, support_y,
                              lr=self.hparams.inner_lr,
                              steps=self.hparams.inner_steps if steps is None else steps,
                              first_order=self.first_order)

    def predict(self, params: Params, adapted: Adapted, query_x: Tensor) -> Tensor:
        return call(self.backbone, adapted, query_x)
