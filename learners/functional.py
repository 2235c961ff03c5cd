"""The inner loop shared by every gradient-based learner: pure functions over parameter dicts.

``gradient_steps`` is used for meta-training, validation and ``orch predict`` alike, so there is
exactly one implementation of "adapt by gradient descent" in orch (``gradient_trajectory`` is the
same loop, keeping every step's weights). Beside it, the small pieces every family uses: a one-hot
that runs under ``vmap`` (``one_hot``) and a meta-parameter dict's parts by key prefix
(``entries``, ``without``, ``fresh_params``).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.func import grad

Params = dict[str, Tensor]
LossFn = Callable[[Params, Tensor, Tensor], Tensor]


# Set by ``plain_autograd``: inner gradients by torch.autograd.grad rather than torch.func.grad.
_PLAIN_AUTOGRAD: ContextVar[bool] = ContextVar("orch_plain_autograd", default=False)


@contextmanager
def plain_autograd() -> Iterator[None]:
    """Take inner gradients with ``torch.autograd.grad`` (``create_graph`` unless first order)
    instead of ``torch.func.grad``, for a caller that differentiates with ordinary autograd:
    ``Learner.batch_gradient``'s per-task loop. Same values; on CPU the plain autograd graph
    runs faster than torch.func's nested transform (benchmarks/throughput.py). Never inside
    ``vmap``: torch.func transforms cannot see through ``torch.autograd.grad``."""
    token = _PLAIN_AUTOGRAD.set(True)
    try:
        yield
    finally:
        _PLAIN_AUTOGRAD.reset(token)


def in_plain_autograd() -> bool:
    """Whether the caller runs under ``plain_autograd``: no torch.func transform is active, so
    in-place writes to fresh buffers are allowed."""
    return _PLAIN_AUTOGRAD.get()


def inner_gradient(loss_of: Callable[[Params], Tensor], fast: Params, *,
                   create_graph: bool) -> Params:
    """The gradient of ``loss_of(fast)`` with respect to every entry of ``fast`` (zeros where
    the loss does not depend on one), differentiable when ``create_graph``."""
    if not _PLAIN_AUTOGRAD.get():
        return grad(loss_of)(fast)
    # Differentiate with respect to fresh aliases of the weights, as ``grad`` does: the loss may
    # close over tensors computed from these same weights before the step (SCA's support
    # summary), which are constants of this gradient. Asked for the weights themselves,
    # autograd would also follow those paths (SCA's meta-gradient was then 10-200% off).
    # A weight made inside the task (the zero head of ``head: zero``) is a constant to autograd;
    # a leaf copy of it is differentiable, with the same value.
    fast = {n: v.view_as(v) if v.requires_grad else v.detach().requires_grad_()
            for n, v in fast.items()}
    names = list(fast)
    grads = torch.autograd.grad(loss_of(fast), [fast[n] for n in names],
                                create_graph=create_graph, allow_unused=True)
    return {n: torch.zeros_like(fast[n]) if g is None else g for n, g in zip(names, grads)}


def gradient_steps(loss_fn: LossFn, params: Params, x: Tensor, y: Tensor, *,
                   lr: float | Mapping[str, Tensor] | Callable[[int], float | Mapping[str, Tensor]],
                   steps: int, first_order: bool = False,
                   adapt_keys: frozenset[str] | None = None, with_step: bool = False) -> Params:
    """``steps`` of gradient descent on ``loss_fn(params, x, y)``, starting from ``params``.

    ``lr`` is a scalar, a per-parameter dict (Meta-SGD; a rate broadcasts against its weight) or
    a function of the step index (MAML++). With ``first_order`` the inner gradients are treated
    as constants, so the outer gradient is the query gradient at the adapted weights (FOMAML);
    otherwise the graph through every step is kept and the outer gradient is the exact second-
    order one (``torch.func.grad`` composes with the caller's autograd). ``adapt_keys`` restricts
    adaptation to some entries (ANIL's head). ``with_step`` calls ``loss_fn(params, x, y, step)``
    for networks with per-step layers (MAML++'s BatchNorm).
    """
    return gradient_trajectory(loss_fn, params, x, y, lr=lr, steps=steps, first_order=first_order,
                               adapt_keys=adapt_keys, with_step=with_step)[-1]


def gradient_trajectory(loss_fn: LossFn, params: Params, x: Tensor, y: Tensor, *,
                        lr: float | Mapping[str, Tensor] | Callable[[int], float | Mapping[str, Tensor]],
                        steps: int, first_order: bool = False,
                        adapt_keys: frozenset[str] | None = None,
                        with_step: bool = False) -> list[Params]:
    """The weights before and after each of ``gradient_steps``' steps (``steps + 1`` dicts), for
    losses on every step's weights (MAML++'s multi-step loss)."""
    trajectory = [params]
    for step in range(steps):
        fast = {k: v for k, v in params.items() if adapt_keys is None or k in adapt_keys}
        frozen = {k: v for k, v in params.items() if k not in fast}
        extra = (step,) if with_step else ()
        grads = inner_gradient(lambda f: loss_fn({**frozen, **f}, x, y, *extra), fast,
                               create_graph=not first_order)
        step_lr = lr(step) if callable(lr) else lr
        params = dict(params)
        for name, g in grads.items():
            if first_order:
                g = g.detach()
            rate = step_lr[name] if isinstance(step_lr, Mapping) else step_lr
            params[name] = params[name] - rate * g
        trajectory.append(params)
    return trajectory


# The any-way head of the gradient family (``head`` knob), after Ye and Chao (2022), "How to train
# your MAML to excel in few-shot classification", and the zeroing trick of Kao et al. (2022).
HEAD_WEIGHT, HEAD_BIAS = "head.weight", "head.bias"
SHARED_HEAD = "head.shared_weight"


def meta_head(params: Params, mode: str) -> Params:
    """Meta-parameters for head ``mode``: ``fixed`` keeps the N-way linear head; ``zero`` drops
    it (every task starts from a zero head); ``shared`` keeps one learned weight vector that every
    class's row starts from (the bias is dropped: a bias shared by all classes shifts every logit
    alike, so it could never change a prediction)."""
    if mode == "fixed":
        return params
    body = {k: v for k, v in params.items() if k not in (HEAD_WEIGHT, HEAD_BIAS)}
    if mode == "zero":
        return body
    return {**body, SHARED_HEAD: params[HEAD_WEIGHT][0].clone()}


def task_head(params: Params, mode: str, *, ways: int | None, features: int) -> Params:
    """The task's starting weights: for ``zero`` and ``shared`` heads, a ``ways``-row head over
    ``features`` inputs made for this task, so one meta-model serves any number of classes. The
    expansion is part of the differentiated function, so the shared vector's meta-gradient sums
    over the rows."""
    if mode == "fixed":
        return params
    if ways is None:
        raise ValueError(f"head: {mode} is for classification (it needs the task's classes)")
    body = {k: v for k, v in params.items() if k != SHARED_HEAD}
    if mode == "zero":
        weight = next(iter(body.values())).new_zeros(ways, features)
    else:
        weight = params[SHARED_HEAD].unsqueeze(0).expand(ways, -1)
    return {**body, HEAD_WEIGHT: weight, HEAD_BIAS: weight.new_zeros(ways)}


def one_hot(labels: Tensor, classes: int) -> Tensor:
    """``[*labels.shape, classes]`` booleans, True at each label's class. Made by comparison
    rather than ``F.one_hot``, which reads the values and so does not run under ``vmap``; callers
    cast it to the dtype they compute in."""
    return labels.unsqueeze(-1) == torch.arange(classes, device=labels.device)


# -- a meta-parameter dict's parts: a network's weights live under their own key prefix (``critic.``,
# ``lstm.``, ``lr.`` for rates), the backbone's under none.

def entries(params: Params, prefix: str) -> Params:
    """The entries of ``params`` under ``prefix`` (``"critic."``), the prefix removed: the weights
    the network under it takes."""
    return {k.removeprefix(prefix): v for k, v in params.items() if k.startswith(prefix)}


def without(params: Params, *prefixes: str) -> Params:
    """``params`` less the entries under any of ``prefixes``: what the network beside them takes."""
    return {k: v for k, v in params.items() if not k.startswith(prefixes)}


def fresh_params(module: nn.Module, prefix: str = "") -> Params:
    """``module``'s freshly initialised weights (every submodule's ``reset_parameters``; the caller
    seeds), detached copies under keys ``prefix + name``."""
    for sub in module.modules():
        if hasattr(sub, "reset_parameters"):
            sub.reset_parameters()
    return {prefix + name: p.detach().clone() for name, p in module.named_parameters()}

