"""Implicit MAML (Rajeswaran, Finn, Kakade and Levine, 2019), the gradient-descent variant.

The meta-parameters are the backbone's initial weights theta, as in MAML. ``adapt`` takes
``inner_steps`` steps of gradient descent on the support loss plus the proximal term
``lam / 2 * |phi - theta|^2`` from phi = theta, and returns phi. The meta-gradient does not
differentiate through those steps: at the proximal problem's solution, d phi / d theta =
(I + H / lam)^-1 with H the support loss's Hessian at phi, so a task contributes the solution v
of (I + H / lam) v = g, g the query loss's gradient at phi, found by ``cg_steps`` of conjugate
gradient on Hessian-vector products. Nothing of the inner steps is kept: memory does not grow
with ``inner_steps``. Like the paper, the system is solved as it stands; the authors' code damps
it (2 I + H / (lam + 10)), which is not done here.

Classification only, as in the paper (Omniglot, mini-ImageNet): the implicit gradient assumes
the inner loop reaches the proximal optimum, and on sinusoid regression the support loss's
curvature grew during meta-training until gradient descent diverged (NaN in 4 of 4 seeds at
rate 0.05 with 30 steps, 2 of 5 at 0.02 with 5 steps and lam 5), the implicit gradient having
no term that penalises an unstable inner loop. The defaults (rate 0.1 as in the authors'
code, 10 steps, lam 1) are cheaper than the paper's Omniglot setting (16 steps, lam 2, which
the benchmark row uses); on the contract test's small synthetic tasks at rate 0.05, 10 steps
with lam 1 learned where 5 or 16 steps with lam 2 mostly did not within 200 iterations.
"""

from __future__ import annotations

from typing import Callable

import torch
from pydantic import Field
from torch import Tensor
from torch.func import vjp

from learners.base import Adapted, Params
from learners.functional import gradient_steps, hessian_vector_product, inner_gradient
from learners.maml import MAML, HeadKnob
from pipelines.base import Task


class IMAMLHyperparameters(HeadKnob):
    inner_lr: float = Field(0.1, gt=0, description="step size of the inner gradient descent on "
                            "the proximal support loss (the authors' Omniglot 0.1)")
    inner_steps: int = Field(10, ge=1, le=1000, description="inner gradient steps per task (the "
                             "paper: 16 for 5-way Omniglot, 25 for 20-way); memory does not grow "
                             "with them")
    lam: float = Field(1.0, gt=0, description="strength of the proximal term lam / 2 |phi - "
                       "theta|^2 that keeps the adapted weights near the meta-parameters (the "
                       "paper: 2)")
    cg_steps: int = Field(5, ge=1, le=100, description="conjugate-gradient steps solving "
                          "(I + H / lam) v = query gradient, one Hessian-vector product each "
                          "(the paper: 5)")


class IMAML(MAML):
    """MAML whose meta-gradient is the implicit one, by conjugate gradient at the adapted weights."""

    name = "imaml"
    Hyperparameters = IMAMLHyperparameters
    task_kinds = ("classification",)
    search_space = {"inner_lr": {"low": 0.01, "high": 0.5, "log": True},
                    "lam": {"low": 0.5, "high": 10.0, "log": True},
                    "outer_lr": {"low": 0.0003, "high": 0.003, "log": True}}
    inner_checkpointing_refusal = ("keeps no inner-loop activations for its meta-gradient (its "
                                   "memory does not grow with inner steps)")

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor, *,
              ways: int | None = None, steps: int | None = None) -> Adapted:
        start = {k: v.detach() for k, v in
                 self.task_params(params, self.ways_of(support_y, ways)).items()}
        return self.proximal_steps(start, support_x, support_y, steps=steps)

    def proximal_steps(self, start: Params, x: Tensor, y: Tensor, *,
                       steps: int | None = None) -> Params:
        """Gradient descent on the support loss plus the proximal term around ``start``; the
        result is a constant (first order: its meta-gradient is the implicit one)."""
        lam = self.hparams.lam

        def loss(p: Params, x: Tensor, y: Tensor) -> Tensor:
            distance = sum(((p[k] - start[k]) ** 2).sum() for k in start)
            return self.support_loss(p, x, y) + 0.5 * lam * distance

        adapted = gradient_steps(loss, start, x, y, lr=self.hparams.inner_lr,
                                 steps=self.hparams.inner_steps if steps is None else steps,
                                 first_order=True)
        return {k: v.detach() for k, v in adapted.items()}

    def task_gradient(self, params: Params, task: Task, *,
                      ways: int | None = None) -> tuple[Params, Tensor, Tensor]:
        ways = self.ways_of(task.support_y, ways)
        meta = {k: v.detach() for k, v in params.items()}
        # The task's starting weights as a function of the meta-parameters (the any-way heads
        # expand or drop entries): the implicit gradient is pulled back through it.
        start, pullback = vjp(lambda m: self.task_params(m, ways), meta)
        adapted = self.proximal_steps({k: v.detach() for k, v in start.items()},
                                      task.support_x, task.support_y)

        def query_loss(p: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            outputs = self.predict(p, p, task.query_x)
            loss = self.objective.loss(outputs, task.query_y)
            return loss, (loss.detach(), outputs.detach())

        g, (loss, outputs) = inner_gradient(query_loss, adapted, create_graph=False,
                                            has_aux=True)
        hessian = hessian_vector_product(
            lambda p: self.support_loss(p, task.support_x, task.support_y), adapted)
        lam = self.hparams.lam
        v = conjugate_gradient(lambda u: {k: u[k] + h / lam for k, h in hessian(u).items()},
                               g, steps=self.hparams.cg_steps)
        (gradient,) = pullback(v)
        return gradient, loss, outputs

    def autograd_task_gradient(self, leaves: Params, task: Task, *,
                               ways: int | None = None) -> tuple[Tensor, Tensor, Params]:
        # The meta-gradient is not a loss gradient through the leaves: it is returned to be
        # added (computed with plain autograd, channels-last batches, as the loop runs it).
        gradient, loss, outputs = self.task_gradient(leaves, task, ways=ways)
        return loss, outputs, gradient


def conjugate_gradient(apply: Callable[[Params], Params], b: Params, *, steps: int) -> Params:
    """``steps`` of conjugate gradient on ``apply(x) = b`` from x = 0 (``apply`` a symmetric
    linear map over parameter dicts; Hestenes and Stiefel). A fixed number of steps and no
    data-dependent branch, so it runs under ``vmap``; a residual that reaches zero stops the
    updates (the divisions are guarded) instead of dividing by it."""
    def dot(u: Params, w: Params) -> Tensor:
        return sum((u[k] * w[k]).sum() for k in u)

    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = dict(b)
    p = dict(b)
    rr = dot(r, r)
    for _ in range(steps):
        ap = apply(p)
        pap = dot(p, ap)
        alpha = torch.where(pap != 0, rr / torch.where(pap != 0, pap, 1), 0)
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        new = dot(r, r)
        beta = torch.where(rr != 0, new / torch.where(rr != 0, rr, 1), 0)
        p = {k: r[k] + beta * p[k] for k in p}
        rr = new
    return x
