"""The critic of Self-Critique and Adapt (Antoniou and Storkey, 2019), as a pure function of a dict.

The critic scores the adapted model's predictions on the unlabelled query set. Its inputs, per
query and output unit (class), are what the paper's best variant conditions on: the prediction
(logit, |logit|, logit^2, softmax probability), the query's embedding, the support embedding of
that class (its prototype) and a task embedding (the mean support embedding). Scoring each
(query, class) pair with one shared network keeps the critic independent of the number of classes,
so it serves any-way tasks. The critic's loss is the mean over queries of the summed scores.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from learners.functional import one_hot


class Critic(nn.Module):
    """A two-hidden-layer network from one (query, class) pair's features to a score.

    Smooth (SiLU) activations: the critic acts through its gradient, and with ReLU that gradient
    would be piecewise constant in the biases, which would then never learn."""

    def __init__(self, features: int, width: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(4 + 3 * features, width), nn.SiLU(),
                                    nn.Linear(width, width), nn.SiLU(),
                                    # No output bias: a constant score has no gradient.
                                    nn.Linear(width, 1, bias=False))

    def forward(self, pairs: Tensor) -> Tensor:
        return self.layers(pairs).squeeze(-1)


def task_summary(embeddings: Tensor, targets: Tensor, units: int | None) -> Tensor:
    """The support set seen by the critic: row 0 the task embedding (mean support embedding),
    then one row per output unit -- a class's mean embedding (classification, ``units`` classes:
    zero for those of a wider fixed head that the task lacks), or the target-weighted mean
    embedding (regression, ``units`` None, one row per output)."""
    if units is None:
        weights = targets.reshape(len(targets), -1) / len(targets)
    else:
        members = one_hot(targets, units).to(embeddings.dtype)
        weights = members / members.sum(dim=0).clamp(min=1)
    prototypes = weights.transpose(0, 1) @ embeddings
    return torch.cat([embeddings.mean(dim=0, keepdim=True), prototypes])


def critic_loss(critic: Critic, params: dict[str, Tensor], outputs: Tensor, embeddings: Tensor,
                summary: Tensor) -> Tensor:
    """The critic's loss of one task's query predictions; ``params`` holds the critic's weights
    (the ``critic.*`` entries, prefix removed)."""
    queries, units = outputs.shape
    context, prototypes = summary[0], summary[1:]
    scores = (torch.softmax(outputs, dim=-1) if units > 1 else torch.ones_like(outputs))
    pairs = torch.cat([
        torch.stack([outputs, outputs.abs(), outputs * outputs, scores], dim=-1),
        embeddings.unsqueeze(1).expand(queries, units, -1),
        prototypes.unsqueeze(0).expand(queries, units, -1),
        context.expand(queries, units, -1)], dim=-1)
    return functional_call(critic, params, (pairs,)).sum(dim=-1).mean()
