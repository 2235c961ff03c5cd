"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu and Wierstra, 2016).

The meta-parameters are an embedding network's weights and, with full context embeddings
(``fce``), the weights of two LSTMs: g, a bidirectional LSTM over the support embeddings, and f,
an attention LSTM that reads the encoded support set ``fce_steps`` times for each query.
``adapt`` embeds (and encodes) the support set; ``predict`` attends over it with a softmax of
cosine similarities and returns the log of the attention-weighted sum of the support labels, so
cross-entropy on the outputs is the paper's training loss. There is no inner loop.
Where the paper is silent: f's LSTM state starts at the query embedding, and K (``fce_steps``)
defaults to 3.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from learners.backbones import call
from learners.base import Adapted, Hyperparameters, Learner, Objective, Params
from learners.functional import entries, fresh_params, one_hot, without
from learners.nets.metric import FullContextEmbedding, encode_queries, encode_support

FCE = "fce."


class MatchingHyperparameters(Hyperparameters):
    fce: bool = Field(True, description="full context embeddings: encode the support set with a "
                      "bidirectional LSTM and each query with an attention LSTM reading it")
    fce_steps: int = Field(3, ge=1, le=20, description="read steps K of the attention LSTM "
                           "over the support set (fce only)")


class Matching(Learner):
    """Matching Networks: cosine attention over the (context-embedded) support set."""

    name = "matching"
    family = "metric"
    Hyperparameters = MatchingHyperparameters
    needs_head = False
    task_kinds = ("classification",)

    def __init__(self, backbone, objective: Objective, hparams: MatchingHyperparameters):
        super().__init__(backbone, objective, hparams)
        self.fce = FullContextEmbedding(backbone.feature_size) if hparams.fce else None

    def initial_params(self, generator: torch.Generator) -> Params:
        params = super().initial_params(generator)
        if self.fce is None:
            return params
        return {**params, **fresh_params(self.fce, generator, FCE)}

    def embed(self, params: Params, x: Tensor) -> Tensor:
        return call(self.backbone, without(params, FCE), x).flatten(start_dim=1)

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor, *,
              ways: int | None = None, steps: int | None = None) -> Adapted:
        ways = self.ways_of(support_y, ways)
        support = self.embed(params, support_x)
        if self.fce is not None:
            support = encode_support(entries(params, FCE), support)
        return {"support": support, "members": one_hot(support_y, ways)}

    def predict(self, params: Params, adapted: Adapted, query_x: Tensor) -> Tensor:
        support = adapted["support"]
        queries = self.embed(params, query_x)
        if self.fce is not None:
            queries = encode_queries(entries(params, FCE), queries, support,
                                     self.hparams.fce_steps)
        cosine = (torch.nn.functional.normalize(queries, dim=-1)
                  @ torch.nn.functional.normalize(support, dim=-1).T)
        attention = torch.log_softmax(cosine, dim=-1)  # [queries, support]
        # log sum_i a(x, x_i) y_i for each class: a log-sum-exp over that class's support items.
        members = adapted["members"].T.unsqueeze(0)  # [1, ways, support]
        masked = torch.where(members, attention.unsqueeze(1), float("-inf"))
        return masked.logsumexp(dim=-1)
