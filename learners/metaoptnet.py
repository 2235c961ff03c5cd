"""MetaOptNet (Lee, Maji, Ravichandran and Soatto, 2019): meta-learning with differentiable convex
optimisation.

The meta-parameters are an embedding network's weights (a backbone without a head) and a learned
temperature ``scale`` on the logits (initialised to 1, as in the paper). ``adapt`` embeds the
support set and fits a linear classifier to it in closed form -- the Crammer-Singer multi-class
SVM solved in its dual (``head: svm``, the paper's MetaOptNet-SVM) or ridge regression onto the
one-hot labels (``head: ridge``, MetaOptNet-RR) -- and returns its class weight vectors;
``predict`` scores embedded queries against them, times ``scale``. The outer gradient flows
through the solver into the embedding: the SVM's dual is solved by ``svm_steps`` unrolled
accelerated projected-gradient steps and differentiated through them (the paper uses qpth's
interior-point solver and implicit differentiation of its KKT conditions; see
``learners.closed_form_heads``), the ridge head by its exact closed form. Any number of classes:
the head is fitted to whatever support set a task brings.

Training uses label smoothing (``label_smoothing``, the paper's 0.1) on the query loss; the
reported loss is the plain cross-entropy.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor
from torch.func import grad

from learners.backbones import call
from learners.base import Adapted, Hyperparameters, Learner, Params
from learners.closed_form_heads import ridge_weights, svm_weights
from learners.functional import one_hot
from pipelines.base import Task

SCALE = "scale"


class MetaOptNetHyperparameters(Hyperparameters):
    head: Literal["svm", "ridge"] = Field(
        "svm", description="base learner: 'svm' (Crammer-Singer multi-class SVM, MetaOptNet-SVM) "
        "or 'ridge' (ridge regression onto one-hot labels, MetaOptNet-RR)")
    svm_c: float = Field(0.1, gt=0, description="the SVM's cost C (the paper: 0.1)")
    svm_steps: int = Field(
        15, ge=1, le=2000, description="unrolled accelerated projected-gradient steps on the SVM "
        "dual in meta-training (the gradient flows through each)")
    svm_test_steps: int = Field(
        200, ge=1, le=2000, description="steps on the SVM dual when evaluating and serving, "
        "where nothing is differentiated: they solve 20-way 1-shot tasks' duals to about 1e-6")
    ridge_lambda: float = Field(50.0, gt=0, description="ridge head's L2 penalty (the paper: 50)")
    label_smoothing: float = Field(
        0.1, ge=0, lt=1, description="label smoothing of the meta-training query loss: the "
        "true class gets 1 - eps, the others eps / (ways - 1) (the paper: 0.1)")


class MetaOptNet(Learner):
    """MetaOptNet with an SVM or ridge-regression head and a learned logit scale."""

    name = "metaoptnet"
    family = "closed-form"
    Hyperparameters = MetaOptNetHyperparameters
    needs_head = False
    task_kinds = ("classification",)
    embeds = True
    search_space = {"outer_lr": {"low": 0.0003, "high": 0.003, "log": True},
                    "svm_c": {"low": 0.01, "high": 1.0, "log": True}}

    def initial_params(self, generator: torch.Generator) -> Params:
        params = super().initial_params(generator)
        weight = next(iter(params.values()))
        return {**params, SCALE: torch.ones((), dtype=weight.dtype, device=weight.device)}

    def embed(self, params: Params, x: Tensor) -> Tensor:
        body = {k: v for k, v in params.items() if k != SCALE}
        return call(self.backbone, body, x).flatten(start_dim=1)

    def embedding(self, params: Params, x: Tensor) -> Tensor:
        return self.embed(params, x)

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor, *,
              ways: int | None = None, steps: int | None = None) -> Adapted:
        return self.fit_head(params, support_x, support_y, ways=ways,
                             svm_steps=self.hparams.svm_test_steps)

    def fit_head(self, params: Params, support_x: Tensor, support_y: Tensor, *,
                 ways: int | None, svm_steps: int) -> Adapted:
        """The head fitted to the embedded support set; ``svm_steps`` solver steps for the SVM."""
        ways = self.ways_of(support_y, ways)
        embeddings = self.embed(params, support_x)
        onehot = one_hot(support_y, ways).to(embeddings.dtype)
        h = self.hparams
        if h.head == "svm":
            weights = svm_weights(embeddings, onehot, c=h.svm_c, steps=svm_steps)
        else:
            weights = ridge_weights(embeddings, onehot, lam=h.ridge_lambda)
        return {"weights": weights}

    def predict(self, params: Params, adapted: Adapted, query_x: Tensor) -> Tensor:
        return params[SCALE] * self.embed(params, query_x) @ adapted["weights"].transpose(0, 1)

    def task_gradient(self, params: Params, task: Task, *,
                      ways: int | None = None) -> tuple[Params, Tensor, Tensor]:
        """The gradient of the label-smoothed query loss (the paper's training loss), through
        ``svm_steps`` solver steps: fewer than at test time, since each is differentiated."""
        ways = self.ways_of(task.support_y, ways)
        # The paper's smoothing spreads eps over the other classes; torch's over all of them.
        smoothing = self.hparams.label_smoothing * ways / (ways - 1) if ways > 1 else 0.0

        def query_loss(p: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            adapted = self.fit_head(p, task.support_x, task.support_y, ways=ways,
                                    svm_steps=self.hparams.svm_steps)
            outputs = self.predict(p, adapted, task.query_x)
            loss = torch.nn.functional.cross_entropy(outputs, task.query_y,
                                                     label_smoothing=smoothing)
            plain = self.objective.loss(outputs, task.query_y)
            return loss, (plain.detach(), outputs.detach())

        gradient, (loss, outputs) = grad(query_loss, has_aux=True)(params)
        return gradient, loss, outputs
