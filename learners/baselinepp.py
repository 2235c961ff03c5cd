"""Baseline++ (Chen, Liu, Kira, Wang and Huang, 2019, "A Closer Look at Few-shot Classification").

Baseline (``learners/baseline.py``) with cosine-similarity classifiers: a class's logit is a scale
times the cosine between the L2-normalised feature and the class's L2-normalised weight vector,
which the authors found reduces intra-class variation. ``adapt`` fits a new cosine head to the
frozen support features the same way. The scale follows the authors' code unless ``scale`` fixes
it: 10 for a head over more than 200 classes (pretraining on Omniglot), 2 for 200 or fewer (each
task's head); with ``learn_scale`` the pretraining head's scale is a meta-parameter learned from
that value. The authors' code also learns a norm per class (weight normalisation, their issues
#4 and #8); that is left out.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field
from torch import Tensor
from torch.nn.functional import normalize

from learners.base import Params
from learners.pretraining import (CLASSIFIER, FitHeadHyperparameters, FitsHead, linear_init,
                                  logit_error)

SCALE = "scale"


class BaselinePlusPlusHyperparameters(FitHeadHyperparameters):
    scale: float | None = Field(None, gt=0, description="the cosine heads' logit scale; default "
                                "the authors': 10 over more than 200 classes, else 2")
    learn_scale: bool = Field(False, description="learn the pretraining head's scale, starting "
                              "from that value (each task's head keeps the fixed one)")


class BaselinePlusPlus(FitsHead):
    """A cosine classifier pretrained over all training classes; a new cosine head per task."""

    name = "baselinepp"
    Hyperparameters = BaselinePlusPlusHyperparameters

    def fixed_scale(self, classes: int) -> float:
        if self.hparams.scale is not None:
            return self.hparams.scale
        return 10.0 if classes > 200 else 2.0

    def initial_params(self, generator: torch.Generator) -> Params:
        params = super().initial_params(generator)
        if self.hparams.learn_scale:
            params[CLASSIFIER + SCALE] = torch.tensor(self.fixed_scale(self.classes))
        return params

    def new_head(self, rows: int, features: int, generator: np.random.Generator) -> Params:
        return linear_init(rows, features, generator, bias=False)

    def scale(self, head: Params) -> Tensor | float:
        """The learned scale where the head has one (the pretraining head), else the fixed one
        for its number of classes."""
        return head[SCALE] if SCALE in head else self.fixed_scale(head["weight"].shape[0])

    def head_logits(self, params: Params, head: Params, features: Tensor) -> Tensor:
        return self.scale(head) * (normalize(features, dim=-1)
                                   @ normalize(head["weight"], dim=-1).transpose(0, 1))

    def head_gradient(self, params: Params, head: Params, features: Tensor,
                      labels: Tensor) -> Params:
        # Through the normalisation w / |w|: the gradient's component along w drops out, and
        # what remains is divided by |w| (the clamp is F.normalize's).
        weight = head["weight"]
        norm = weight.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        unit = weight / norm
        error = logit_error(self.head_logits(params, head, features), labels)
        along_unit = self.scale(head) * error.transpose(0, 1) @ normalize(features, dim=-1)
        return {"weight": (along_unit - unit * (along_unit * unit).sum(-1, keepdim=True)) / norm}
