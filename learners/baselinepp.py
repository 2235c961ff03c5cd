"""Baseline++ (Chen, Liu, Kira, Wang and Huang, 2019, "A Closer Look at Few-shot Classification").

Baseline (``learners/baseline.py``) with a cosine-similarity classifier: a class's logit is
``scale`` times the cosine between the L2-normalised feature and the class's L2-normalised weight
vector, which the authors found reduces intra-class variation. ``adapt`` fits a new cosine head
to the frozen support features the same way, with the same scale. The scale is fixed (the
authors' code: 10 over Omniglot's thousands of classes, 2 over 200 or fewer) or, with
``learn_scale``, a meta-parameter learned in pretraining from that value. The authors' code
also learns a norm per class (weight normalisation, their issues #4 and #8); that is left out.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field
from torch import Tensor
from torch.nn.functional import normalize

from learners.base import Params
from learners.pretraining import FitHeadHyperparameters, FitsHead, linear_init, logit_error

SCALE = "scale"


class BaselinePlusPlusHyperparameters(FitHeadHyperparameters):
    scale: float = Field(10.0, gt=0, description="the cosine head's logit scale, or its initial "
                         "value with learn_scale")
    learn_scale: bool = Field(False, description="learn the scale in pretraining")


class BaselinePlusPlus(FitsHead):
    """A cosine classifier pretrained over all training classes; a new cosine head per task."""

    name = "baselinepp"
    Hyperparameters = BaselinePlusPlusHyperparameters
    extra_entries = (SCALE,)

    def init_params(self, seed: int) -> Params:
        params = super().init_params(seed)
        if self.hparams.learn_scale:
            params[SCALE] = torch.tensor(float(self.hparams.scale))
        return params

    def new_head(self, rows: int, features: int, generator: np.random.Generator) -> Params:
        return linear_init(rows, features, generator, bias=False)

    def scale(self, params: Params) -> Tensor | float:
        return params[SCALE] if self.hparams.learn_scale else self.hparams.scale

    def head_logits(self, params: Params, head: Params, features: Tensor) -> Tensor:
        return self.scale(params) * (normalize(features, dim=-1)
                                     @ normalize(head["weight"], dim=-1).transpose(0, 1))

    def head_gradient(self, params: Params, head: Params, features: Tensor,
                      labels: Tensor) -> Params:
        # Through the normalisation w / |w|: the gradient's component along w drops out, and
        # what remains is divided by |w| (the clamp is F.normalize's).
        weight = head["weight"]
        norm = weight.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        unit = weight / norm
        error = logit_error(self.head_logits(params, head, features), labels)
        along_unit = self.scale(params) * error.transpose(0, 1) @ normalize(features, dim=-1)
        return {"weight": (along_unit - unit * (along_unit * unit).sum(-1, keepdim=True)) / norm}
