"""Relation Networks (Sung, Yang, Zhang, Xiang, Torr and Hospedales, 2018).

The meta-parameters are an embedding module's weights and a relation module's (``relation.*``).
``adapt`` embeds the support set into feature maps (vectors for the mlp backbone) and sums each
class's into one; ``predict`` concatenates every query's features with every class's and scores
the pair with the relation module, a relation score in [0, 1]. Training regresses the scores on
one-hot targets with mean squared error, as the paper does. There is no inner loop.
Unlike the authors' code: PyTorch's default initialisation, no gradient clipping, and Conv-4's
pooled last maps (1x1 for 28x28 images) where their encoder keeps 5x5 maps.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from learners.backbones import call
from learners.base import Adapted, Hyperparameters, Learner, Objective, Params
from learners.functional import entries, fresh_params, one_hot, without
from learners.nets.metric import relation_module

RELATION = "relation."


def one_hot_mse(scores: Tensor, targets: Tensor) -> Tensor:
    """Mean squared error of relation scores ``[queries, ways]`` against one-hot targets."""
    targets = one_hot(targets, scores.shape[-1]).to(scores.dtype)
    return torch.nn.functional.mse_loss(scores, targets)


class RelationHyperparameters(Hyperparameters):
    relation_hidden: int = Field(8, ge=1, le=1024, description="width of the relation module's "
                                 "hidden fully connected layer (paper: 8 for Omniglot)")


class Relation(Learner):
    """Relation Networks: a learned relation module scores (class, query) feature pairs."""

    name = "relation"
    family = "metric"
    Hyperparameters = RelationHyperparameters
    needs_head = False
    task_kinds = ("classification",)
    unsupported_backbones = {"resnet12": "its relation module compares spatial feature maps, "
                                         "which ResNet-12 flattens; use conv4"}

    def __init__(self, backbone, objective: Objective, hparams: RelationHyperparameters):
        # The paper's loss replaces cross-entropy for training and for the reported query loss.
        super().__init__(backbone, Objective(loss=one_hot_mse, classification=True), hparams)
        self.feature_shape = tuple(backbone.feature_shape)
        self.relation = relation_module(self.feature_shape, hparams.relation_hidden)

    def initial_params(self, generator: torch.Generator) -> Params:
        return {**super().initial_params(generator),
                **fresh_params(self.relation, generator, RELATION)}

    def embed(self, params: Params, x: Tensor) -> Tensor:
        features = call(self.backbone, without(params, RELATION), x)
        return features.reshape(len(x), *self.feature_shape)

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor, *,
              ways: int | None = None, steps: int | None = None) -> Adapted:
        members = one_hot(support_y, self.ways_of(support_y, ways))
        features = self.embed(params, support_x)
        # K-shot: the element-wise sum of the class's support features.
        classes = torch.einsum("sw,s...->w...", members.to(features.dtype), features)
        return {"classes": classes}

    def predict(self, params: Params, adapted: Adapted, query_x: Tensor) -> Tensor:
        classes = adapted["classes"]  # [ways, *feature_shape]
        queries = self.embed(params, query_x)
        count, ways = len(queries), len(classes)
        pairs = torch.cat([classes.unsqueeze(0).expand(count, *classes.shape),
                           queries.unsqueeze(1).expand(count, ways, *queries.shape[1:])], dim=2)
        logits = call(self.relation, entries(params, RELATION),
                             pairs.reshape(count * ways, *pairs.shape[2:]))
        return torch.sigmoid(logits).reshape(count, ways)
