"""Siamese Neural Networks for one-shot image recognition (Koch, Zemel and Salakhutdinov, 2015).

The meta-parameters are the twin encoder's weights and a verification head (``verify.*``): the
probability that two images show the same class is a sigmoid of a learned weighting of the L1
distance between their encodings. Training is verification, not classification: every pair of a
training episode's images (support and queries) is a same/different example, trained with binary
cross-entropy. ``adapt`` encodes the support set; ``predict`` gives each query, for each class,
the highest same-logit over that class's support images, so the argmax is Koch's one-shot rule.
Unlike the paper: the backbone (Conv-4) is the twin, without Koch's 4096-unit sigmoid layer, and
pairs come from each training episode rather than a fixed set of distorted pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import grad

from learners.backbones import call
from learners.base import Adapted, Hyperparameters, Learner, Objective, Params
from learners.functional import entries, fresh_params, one_hot, without
from pipelines.base import Task

VERIFY = "verify."


class Siamese(Learner):
    """Siamese verification network; one-shot classification by the most similar support image."""

    name = "siamese"
    family = "metric"
    needs_head = False
    task_kinds = ("classification",)

    def __init__(self, backbone, objective: Objective, hparams: Hyperparameters):
        super().__init__(backbone, objective, hparams)
        # sum_j alpha_j |h1_j - h2_j| + bias: one linear unit on the L1 distance.
        self.verify = nn.Linear(backbone.feature_size, 1)

    def initial_params(self, generator: torch.Generator) -> Params:
        return {**super().initial_params(generator), **fresh_params(self.verify, generator, VERIFY)}

    def embed(self, params: Params, x: Tensor) -> Tensor:
        return call(self.backbone, without(params, VERIFY), x).flatten(start_dim=1)

    def same_logits(self, params: Params, a: Tensor, b: Tensor) -> Tensor:
        """Logits ``[len(a), len(b)]`` that encodings ``a[i]`` and ``b[j]`` show the same class."""
        distance = (a.unsqueeze(1) - b.unsqueeze(0)).abs()
        return call(self.verify, entries(params, VERIFY), distance).squeeze(-1)

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor, *,
              ways: int | None = None, steps: int | None = None) -> Adapted:
        members = one_hot(support_y, self.ways_of(support_y, ways))
        return {"support": self.embed(params, support_x), "members": members}

    def predict(self, params: Params, adapted: Adapted, query_x: Tensor) -> Tensor:
        logits = self.same_logits(params, self.embed(params, query_x), adapted["support"])
        return by_class(logits, adapted["members"])

    def task_gradient(self, params: Params, task: Task, *,
                      ways: int | None = None) -> tuple[Params, Tensor, Tensor]:
        """The gradient of the verification loss over all pairs of the episode's images (same-
        class pairs and different-class pairs weighted half each, the balanced mix of Koch's
        training set without sampling it), with the query outputs of one-shot classification."""
        members = one_hot(task.support_y, self.ways_of(task.support_y, ways))
        labels = torch.cat([task.support_y, task.query_y])
        count, support = len(labels), len(task.support_y)
        upper = torch.ones(count, count, dtype=torch.bool, device=labels.device).triu(1)
        same = labels.unsqueeze(1) == labels.unsqueeze(0)

        def verification_loss(p: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            # Support and queries encoded apart, as adapt and predict encode them.
            encodings = torch.cat([self.embed(p, task.support_x), self.embed(p, task.query_x)])
            logits = self.same_logits(p, encodings, encodings)
            losses = nn.functional.binary_cross_entropy_with_logits(
                logits, same.to(logits.dtype), reduction="none")
            loss = 0.0
            for kind in (same & upper, ~same & upper):
                weights = kind.to(logits.dtype)
                loss = loss + 0.5 * (losses * weights).sum() / weights.sum().clamp(min=1)
            outputs = by_class(logits[support:, :support], members)
            return loss, (loss.detach(), outputs.detach())

        gradient, (loss, outputs) = grad(verification_loss, has_aux=True)(params)
        return gradient, loss, outputs


def by_class(logits: Tensor, members: Tensor) -> Tensor:
    """``[queries, ways]``: for each class the largest logit over its support items."""
    masked = torch.where(members.T.unsqueeze(0), logits.unsqueeze(1), float("-inf"))
    return masked.amax(dim=-1)
