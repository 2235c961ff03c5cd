"""ANIL, Almost No Inner Loop (Raghu, Raghu, Bengio and Vinyals, 2020).

The meta-parameters are the backbone's initial weights, as in MAML, but ``adapt`` takes its
``inner_steps`` gradient steps on the output head only and returns the body's weights unchanged
with the adapted head; the body learns from the outer gradient alone (second order through the
head's steps, as in the paper). The support set goes through the body once per task: the
head's steps run on its features. With ``head: zero`` or ``shared`` the adapted head is made per
task, so a model trained 5-way serves any number of classes.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor
from torch.nn.functional import linear

from learners.backbones import call
from learners.base import Adapted, Params
from learners.functional import HEAD_BIAS, HEAD_WEIGHT, entries, gradient_steps
from learners.maml import MAML, HeadKnob


class ANILHyperparameters(HeadKnob):
    inner_lr: float = Field(0.01, gt=0, description="step size of the head's inner gradient "
                            "descent")
    inner_steps: int = Field(1, ge=1, le=100, description="inner gradient steps on the head per "
                             "task")


class ANIL(MAML):
    """MAML with the inner loop restricted to the output head."""

    name = "anil"
    Hyperparameters = ANILHyperparameters
    search_space = {"inner_lr": {"low": 0.01, "high": 1.0, "log": True},
                    "outer_lr": {"low": 0.0003, "high": 0.003, "log": True}}
    inner_checkpointing_refusal = None

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor, *,
              ways: int | None = None, steps: int | None = None) -> Adapted:
        start = self.task_params(params, self.ways_of(support_y, ways))
        body = {k: v for k, v in start.items() if k not in (HEAD_WEIGHT, HEAD_BIAS)}
        features = call(self.backbone.body, entries(body, "body."), support_x)
        head = gradient_steps(self.head_loss, {HEAD_WEIGHT: start[HEAD_WEIGHT],
                                               HEAD_BIAS: start[HEAD_BIAS]},
                              features, support_y, lr=self.hparams.inner_lr,
                              steps=self.hparams.inner_steps if steps is None else steps,
                              first_order=self.first_order,
                              recompute_every=self.inner_checkpointing)
        return {**body, **head}

    def head_loss(self, head: Params, features: Tensor, y: Tensor) -> Tensor:
        return self.objective.loss(linear(features, head[HEAD_WEIGHT], head[HEAD_BIAS]), y)
