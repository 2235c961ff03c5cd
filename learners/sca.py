"""Self-Critique and Adapt: "Learning to Learn via Self-Critique" (Antoniou and Storkey, 2019).

The meta-parameters are the backbone's initial weights and a critic network's weights
(``critic.*``, see ``learners.nets.sca``). ``adapt`` takes MAML's ``inner_steps`` on the labelled
support set and returns the fast weights with a summary of the support set (task embedding and
class embeddings). ``predict`` is where the query set is first seen, unlabelled: the critic scores
the adapted model's query predictions, ``critic_steps`` (I) gradient steps on that score refine
the fast weights, and the refined model predicts. The outer loss is the labelled query loss after
those steps, differentiated through the critic steps (always: that is how the critic learns) and,
unless ``first_order``, through the support steps (second order, the default, as the paper).
Predictions are transductive: the critic adapts to the batch of queries ``predict`` is given.
Not from the paper: its learned per-layer, per-step inner rates (MAML++'s LSLR) and the annealed
mix of pre- and post-critic query losses; the outer loss here is the post-critic one alone.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor
from torch.func import functional_call

from learners.backbones import call
from learners.base import Adapted, Objective, Params
from learners.functional import entries, fresh_params, gradient_steps, without
from learners.maml import MAML, HeadKnob
from learners.nets.sca import Critic, critic_loss, task_summary

PREFIX = "critic."
SUMMARY = "task.summary"  # the adapted state's support summary, beside the fast weights
HEAD = ("head.weight", "head.bias")


class SCAHyperparameters(HeadKnob):
    inner_lr: float = Field(0.4, gt=0, description="step size of the support-set gradient steps")
    inner_steps: int = Field(1, ge=1, le=100, description="gradient steps on the labelled "
                             "support set")
    critic_steps: int = Field(1, ge=0, le=100, description="I: gradient steps on the critic's "
                              "loss of the unlabelled query predictions, after the support steps")
    critic_lr: float = Field(0.1, gt=0, description="step size of the critic steps")
    critic_width: int = Field(32, ge=1, le=1024, description="units in each of the critic's two "
                              "hidden layers")
    first_order: bool = Field(False, description="treat the support-step gradients as constants "
                              "(the critic steps are always differentiated: the critic learns "
                              "through them)")
    critic_adapts: Literal["all", "head"] = Field(
        "all", description="which fast weights the critic steps refine: 'all' (the paper) or "
        "only the output 'head' (the query embeddings are then computed once: a critic step "
        "costs almost nothing)")


class SCA(MAML):
    """MAML whose fast weights are refined on the unlabelled queries by a learned critic."""

    name = "sca"
    Hyperparameters = SCAHyperparameters
    search_space = {"inner_lr": {"low": 0.05, "high": 0.5, "log": True},
                    "critic_lr": {"low": 0.01, "high": 0.5, "log": True},
                    "outer_lr": {"low": 0.0003, "high": 0.003, "log": True}}

    def __init__(self, backbone, objective: Objective, hparams: SCAHyperparameters):
        super().__init__(backbone, objective, hparams)
        self.critic = Critic(backbone.feature_size, hparams.critic_width)

    def initial_params(self, generator: torch.Generator) -> Params:
        learner = super().initial_params(generator)  # draws the backbone first
        return {**learner, **fresh_params(self.critic, generator, PREFIX)}

    def embed(self, weights: Params, x: Tensor) -> Tensor:
        body = entries(weights, "body.")
        return functional_call(self.backbone.body, body, (x,)).flatten(start_dim=1)

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor, *,
              ways: int | None = None, steps: int | None = None) -> Adapted:
        ways = self.ways_of(support_y, ways)
        start = self.task_params(without(params, PREFIX), ways)
        fast = gradient_steps(self.support_loss, start, support_x, support_y,
                              lr=self.hparams.inner_lr,
                              steps=self.hparams.inner_steps if steps is None else steps,
                              first_order=self.hparams.first_order)
        # One summary row per output unit: a fixed head may have more classes than the task.
        units = fast["head.weight"].shape[0] if ways is not None else None
        return {**fast, SUMMARY: task_summary(self.embed(fast, support_x), support_y, units)}

    def predict(self, params: Params, adapted: Adapted, query_x: Tensor) -> Tensor:
        critic = entries(params, PREFIX)
        fast = {k: v for k, v in adapted.items() if k != SUMMARY}

        def head(weights: Params, embeddings: Tensor) -> Tensor:
            return torch.nn.functional.linear(embeddings, weights["head.weight"],
                                              weights["head.bias"])

        def critic_score(weights: Params, x: Tensor, summary: Tensor) -> Tensor:
            embeddings = self.embed(weights, x) if self.hparams.critic_adapts == "all" else x
            return critic_loss(self.critic, critic, head(weights, embeddings), embeddings, summary)

        if self.hparams.critic_adapts == "all":
            fast = gradient_steps(critic_score, fast, query_x, adapted[SUMMARY],
                                  lr=self.hparams.critic_lr, steps=self.hparams.critic_steps)
            return call(self.backbone, fast, query_x)
        embeddings = self.embed(fast, query_x)
        fast = gradient_steps(critic_score, {k: fast[k] for k in HEAD}, embeddings,
                              adapted[SUMMARY], lr=self.hparams.critic_lr,
                              steps=self.hparams.critic_steps)
        return head(fast, embeddings)
