"""SimpleShot (Wang, Chao, Weinberger and van der Maaten, 2019), CL2N nearest class mean.

Pretrained as Baseline is (a backbone and a linear classifier over every training class,
``learners/pretraining.py``). The meta-parameters also hold ``feature_mean``, the mean feature of
the training images: a running statistic (``is_statistic``) that every iteration moves 0.1 of
the way to the mean of its shards' features, so at the end it averages the features of the last
few dozen iterations' images under the final weights (the authors average one pass over the
training set after training). ``adapt`` centres the support features on it, L2-normalises them
and averages each class's into its mean; ``predict`` scores a query, centred and normalised
alike, by its negative squared Euclidean distance to each mean (the authors' nearest mean).
"""

from __future__ import annotations

import torch
from torch import Tensor

from learners.base import Adapted, Params
from learners.functional import one_hot
from learners.pretraining import LinearHead, Pretrained

FEATURE_MEAN = "feature_mean"


class SimpleShot(LinearHead, Pretrained):
    """Nearest class mean of centred, L2-normalised features of a pretrained backbone."""

    name = "simpleshot"
    extra_entries = (FEATURE_MEAN,)

    def initial_params(self, generator: torch.Generator) -> Params:
        params = super().initial_params(generator)
        return {**params, FEATURE_MEAN: torch.zeros(self.backbone.feature_size)}

    def is_statistic(self, name: str) -> bool:
        return name == FEATURE_MEAN

    def feature_mean(self, params: Params) -> Tensor | None:
        return params[FEATURE_MEAN]

    def shard_statistics(self, params: Params, features: Tensor) -> Params:
        return {FEATURE_MEAN: params[FEATURE_MEAN] - features.mean(dim=0)}

    def normalised(self, params: Params, x: Tensor) -> Tensor:
        """CL2N: features centred on the training mean, then L2-normalised."""
        centred = self.embed(params, x) - params[FEATURE_MEAN]
        return torch.nn.functional.normalize(centred, dim=-1)

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor, *,
              ways: int | None = None, steps: int | None = None) -> Adapted:
        ways = self.ways_of(support_y, ways)
        features = self.normalised(params, support_x)
        members = one_hot(support_y, ways).to(features.dtype)
        means = members.transpose(0, 1) @ features / members.sum(dim=0).unsqueeze(-1)
        return {"means": means}

    def predict(self, params: Params, adapted: Adapted, query_x: Tensor) -> Tensor:
        differences = self.normalised(params, query_x).unsqueeze(1) - adapted["means"].unsqueeze(0)
        return -(differences * differences).sum(dim=-1)
