"""MAML++ (Antoniou, Edwards and Storkey, 2019, "How to train your MAML").

MAML with the paper's fixes: a multi-step loss (the query loss after every inner step, weighted,
the weights annealed toward the last step's), a learned inner rate per layer and per step
(``lr.<weight>``, one entry per step), BatchNorm weights and biases per step (see
``learners.nets.mamlpp``), first-order meta-gradients for the first part of training and
second-order after, and a cosine-annealed outer rate. The meta-parameters are the backbone's
initial weights with per-step BatchNorm rows and the per-step rates; ``adapt`` returns the fast
weights after ``inner_steps`` steps, with the BatchNorm row for that many steps. BatchNorm weights
are learned by the outer loop only (the authors' setting).

Running statistics: the paper also keeps BatchNorm running statistics per step, but its authors'
code calls batch_norm in training mode, so it always normalises with the batch's own statistics
and never reads them. orch normalises with batch statistics too -- in meta-training, evaluation
and serving alike -- and keeps none: an earlier version gathered them as a moving average, and
evaluating with them scored 0.23 (chance 0.2) against over 0.4 with batch statistics on a short
Omniglot run (Conv-4, 8 filters, 60 iterations), since the weights are meta-trained with per-task
normalisation.
"""

from __future__ import annotations

from pydantic import Field
import torch
from torch import Tensor
from torch.func import grad

from learners.base import Adapted, Objective, Params
from learners.functional import (HEAD_BIAS, HEAD_WEIGHT, SHARED_HEAD, entries,
                                 gradient_trajectory, without)
from learners.maml import MAML, HeadKnob
from learners.nets.mamlpp import forward, norm_layers, per_step, row_view
from pipelines.base import Task

RATE = "lr."


class MAMLPlusPlusHyperparameters(HeadKnob):
    inner_lr: float = Field(0.1, gt=0, description="initial value of every per-layer, per-step "
                            "inner learning rate (learned afterwards); the authors' Omniglot 0.1")
    inner_steps: int = Field(2, ge=1, le=20, description="inner gradient steps per task, also "
                             "the number of per-step rates (and BatchNorm rows, one more); the "
                             "authors take 5 on a GPU, 2 fits a CPU budget")
    msl_fraction: float = Field(0.1, ge=0, le=1, description="fraction of meta-training over "
                                "which the multi-step loss weights anneal from uniform toward "
                                "the last step; after it only the last step's query loss counts "
                                "(authors' Omniglot: 10 of 100 epochs)")
    first_order_fraction: float = Field(1 / 3, ge=0, le=1, description="fraction of meta-"
                                        "training done with first-order meta-gradients before "
                                        "switching to second order (the paper: 50 of 150 epochs)")


class MAMLPlusPlus(MAML):
    """MAML with multi-step loss, per-step rates and BatchNorm, and annealed derivative order."""

    name = "mamlpp"
    Hyperparameters = MAMLPlusPlusHyperparameters
    outer_schedule = "cosine"
    unsupported_backbones = {"resnet12": "its per-step BatchNorm follows Conv-4's blocks "
                                         "(conv, norm, pool), not ResNet-12's; use conv4"}
    search_space = {"inner_lr": {"low": 0.01, "high": 0.5, "log": True},
                    "outer_lr": {"low": 0.0003, "high": 0.003, "log": True}}

    def __init__(self, backbone, objective: Objective, hparams: MAMLPlusPlusHyperparameters):
        super().__init__(backbone, objective, hparams)
        self.layers = norm_layers(backbone)

    def initial_params(self, generator: torch.Generator) -> Params:
        steps, rate = self.hparams.inner_steps, self.hparams.inner_lr
        weights = per_step(super().initial_params(generator), self.layers, steps + 1)
        norms = {layer + key for layer in self.layers for key in ("weight", "bias")}
        adapted = [k for k in weights if k not in norms and k != SHARED_HEAD]
        if self.hparams.head != "fixed":
            adapted += [HEAD_WEIGHT, HEAD_BIAS]  # made per task; their rates are meta-parameters
        first = next(iter(weights.values()))
        return {**weights, **{RATE + k: first.new_full((steps,), rate) for k in adapted}}

    def loss_weights(self, progress: float) -> list[float]:
        """The multi-step loss's weight per step (the authors' schedule): uniform at the start,
        non-final steps decaying linearly to 0.03 / steps over ``msl_fraction`` of training while
        the last step's grows, then the last step's loss alone."""
        steps, span = self.hparams.inner_steps, self.hparams.msl_fraction
        if steps == 1 or progress >= span:
            return [0.0] * (steps - 1) + [1.0]
        done, floor = progress / span, 0.03 / steps
        early = max(1 / steps - done / steps, floor)
        last = min(1 / steps + done * (steps - 1) / steps, 1 - (steps - 1) * floor)
        return [early] * (steps - 1) + [last]

    def trajectory(self, params: Params, support_x: Tensor, support_y: Tensor, *,
                   ways: int | None, steps: int, first_order: bool) -> list[Params]:
        """The fast weights before and after each inner step (per-step rows still whole)."""
        start = self.task_params(without(params, RATE), ways)
        rates = entries(params, RATE)

        def support_loss(p: Params, x: Tensor, y: Tensor, step: int) -> Tensor:
            return self.objective.loss(self.outputs(p, x, row=step), y)

        return gradient_trajectory(
            support_loss, start, support_x, support_y, steps=steps, first_order=first_order,
            # Steps beyond the trained ones (evaluation) reuse the last step's rates.
            lr=lambda step: {k: r[min(step, len(r) - 1)] for k, r in rates.items()},
            adapt_keys=frozenset(rates), with_step=True)

    def outputs(self, params: Params, x: Tensor, *, row: int) -> Tensor:
        return forward(self.backbone, row_view(params, self.layers, row), x)

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor, *,
              ways: int | None = None, steps: int | None = None) -> Adapted:
        steps = self.hparams.inner_steps if steps is None else steps
        fast = self.trajectory(params, support_x, support_y, ways=self.ways_of(support_y, ways),
                               steps=steps, first_order=False)[-1]
        return row_view(fast, self.layers, steps)

    def predict(self, params: Params, adapted: Adapted, query_x: Tensor) -> Tensor:
        return forward(self.backbone, adapted, query_x)

    def task_gradient(self, params: Params, task: Task, *,
                      ways: int | None = None) -> tuple[Params, Tensor, Tensor]:
        gradient, (loss, outputs) = grad(lambda p: self.multi_step_loss(p, task, ways=ways),
                                         has_aux=True)(params)
        return gradient, loss, outputs

    def autograd_task_gradient(self, leaves: Params, task: Task, *,
                               ways: int | None = None) -> tuple[Tensor, Tensor, Params]:
        total, (loss, outputs) = self.multi_step_loss(leaves, task, ways=ways)
        total.backward()
        return loss, outputs, {}

    def multi_step_loss(self, params: Params, task: Task, *, ways: int | None = None
                        ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The weighted sum of the query losses after each inner step (``loss_weights``), first
        order early in training (``first_order_fraction``); with the last step's query loss and
        outputs."""
        steps, ways = self.hparams.inner_steps, self.ways_of(task.support_y, ways)
        weights = self.loss_weights(self.progress)
        first_order = self.progress < self.hparams.first_order_fraction
        path = self.trajectory(params, task.support_x, task.support_y, ways=ways, steps=steps,
                               first_order=first_order)
        total = 0.0
        for step, weight in enumerate(weights):
            if weight > 0:
                outputs = self.outputs(path[step + 1], task.query_x, row=step + 1)
                loss = self.objective.loss(outputs, task.query_y)
                total = total + weight * loss
        return total, (loss.detach(), outputs.detach())
