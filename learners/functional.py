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
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

import torch
from torch import Tensor, nn
from torch.func import grad, vjp

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


def inner_gradient(loss_of: Callable[[Params], Any], fast: Params, *,
                   create_graph: bool, has_aux: bool = False) -> Any:
    """The gradient of ``loss_of(fast)`` with respect to every entry of ``fast`` (zeros where
    the loss does not depend on one), differentiable when ``create_graph``. With ``has_aux``,
    ``loss_of`` returns ``(loss, aux)`` and this ``(gradient, aux)``."""
    if not _PLAIN_AUTOGRAD.get():
        return grad(loss_of, has_aux=has_aux)(fast)
    # Differentiate with respect to fresh aliases of the weights, as ``grad`` does: the loss may
    # close over tensors computed from these same weights before the step (SCA's support
    # summary), which are constants of this gradient. Asked for the weights themselves,
    # autograd would also follow those paths (SCA's meta-gradient was then 10-200% off).
    # A weight made inside the task (the zero head of ``head: zero``) is a constant to autograd;
    # a leaf copy of it is differentiable, with the same value.
    fast = {n: v.view_as(v) if v.requires_grad else v.detach().requires_grad_()
            for n, v in fast.items()}
    names = list(fast)
    loss, aux = loss_of(fast) if has_aux else (loss_of(fast), None)
    grads = torch.autograd.grad(loss, [fast[n] for n in names],
                                create_graph=create_graph, allow_unused=True)
    found = {n: torch.zeros_like(fast[n]) if g is None else g for n, g in zip(names, grads)}
    return (found, aux) if has_aux else found


def hessian_vector_product(loss_of: Callable[[Params], Tensor],
                           at: Params) -> Callable[[Params], Params]:
    """``v -> H v``, H the Hessian of ``loss_of`` at ``at`` (constants, not differentiated
    further): the loss's gradient graph is built once and differentiated again for each ``v``
    (H is symmetric, so this vector-Jacobian product is H v). By torch.func's ``vjp`` of
    ``grad`` outside the autograd loop (it runs under ``vmap``), by ``torch.autograd.grad``
    in it."""
    if not _PLAIN_AUTOGRAD.get():
        _, pullback = vjp(grad(loss_of), at)
        return lambda v: pullback(v)[0]
    leaves = {n: v.detach().requires_grad_() for n, v in at.items()}
    names = list(leaves)
    grads = torch.autograd.grad(loss_of(leaves), [leaves[n] for n in names], create_graph=True,
                                allow_unused=True)
    # Entries the gradient does not depend on (a loss linear in them) have a zero row of H.
    pairs = [(g, n) for g, n in zip(grads, names) if g is not None and g.requires_grad]

    def product(v: Params) -> Params:
        found = torch.autograd.grad([g for g, _ in pairs], [leaves[n] for n in names],
                                    [v[n] for _, n in pairs], retain_graph=True,
                                    allow_unused=True)
        return {n: torch.zeros_like(v[n]) if h is None else h for n, h in zip(names, found)}
    return product


Rate = Union[float, Mapping[str, Tensor], Callable[[int], Union[float, Mapping[str, Tensor]]]]


def gradient_steps(loss_fn: LossFn, params: Params, x: Tensor, y: Tensor, *, lr: Rate,
                   steps: int, first_order: bool = False,
                   adapt_keys: frozenset[str] | None = None, with_step: bool = False,
                   recompute_every: int | None = None) -> Params:
    """``steps`` of gradient descent on ``loss_fn(params, x, y)``, starting from ``params``.

    ``lr`` is a scalar, a per-parameter dict (Meta-SGD; a rate broadcasts against its weight) or
    a function of the step index (MAML++). With ``first_order`` the inner gradients are treated
    as constants, so the outer gradient is the query gradient at the adapted weights (FOMAML);
    otherwise the graph through every step is kept and the outer gradient is the exact second-
    order one (``torch.func.grad`` composes with the caller's autograd). ``adapt_keys`` restricts
    adaptation to some entries (ANIL's head). ``with_step`` calls ``loss_fn(params, x, y, step)``
    for networks with per-step layers (MAML++'s BatchNorm).

    ``recompute_every`` (``training.inner_checkpointing``) keeps, of a second-order loop that
    an outer backward will differentiate, only the weights after every that many steps: each
    segment runs without its graph and is run again, with it, when the outer backward reaches
    it (``_RecomputedSegment``). The meta-gradient is the same; memory holds one segment's
    activations instead of every step's, for about one more forward and inner backward per
    step. Only in the CPU autograd loop (``plain_autograd``), whose outer backward is ordinary
    autograd, and only for losses that read nothing but their arguments.
    """
    if (recompute_every is not None and not first_order and torch.is_grad_enabled()
            and steps > 0):
        if not _PLAIN_AUTOGRAD.get():
            raise ValueError("inner checkpointing recomputes the inner loop with ordinary "
                             "autograd; it cannot run under torch.func transforms (set "
                             "training.vectorize: off)")
        if with_step or callable(lr):
            raise ValueError("inner checkpointing takes a fixed rate per weight and one "
                             "network for every step")
        return _recomputed_steps(loss_fn, params, x, y, lr=lr, steps=steps,
                                 adapt_keys=adapt_keys, every=recompute_every)
    # Step by step, not ``gradient_trajectory(...)[-1]``: a first-order loop then holds one
    # step's weights at a time, not every step's.
    for step in range(steps):
        params = gradient_step(loss_fn, params, x, y, lr=lr, step=step, first_order=first_order,
                               adapt_keys=adapt_keys, with_step=with_step)
    return params


def gradient_trajectory(loss_fn: LossFn, params: Params, x: Tensor, y: Tensor, *, lr: Rate,
                        steps: int, first_order: bool = False,
                        adapt_keys: frozenset[str] | None = None,
                        with_step: bool = False) -> list[Params]:
    """The weights before and after each of ``gradient_steps``' steps (``steps + 1`` dicts), for
    losses on every step's weights (MAML++'s multi-step loss)."""
    trajectory = [params]
    for step in range(steps):
        params = gradient_step(loss_fn, params, x, y, lr=lr, step=step, first_order=first_order,
                               adapt_keys=adapt_keys, with_step=with_step)
        trajectory.append(params)
    return trajectory


def gradient_step(loss_fn: LossFn, params: Params, x: Tensor, y: Tensor, *, lr: Rate, step: int,
                  first_order: bool = False, adapt_keys: frozenset[str] | None = None,
                  with_step: bool = False, create_graph: bool | None = None) -> Params:
    """Step ``step`` of ``gradient_steps``: ``params`` less the rate times the loss gradient
    (the adapted entries). ``create_graph`` False computes the same values without the graph
    of the inner gradient (default: unless ``first_order``)."""
    fast = {k: v for k, v in params.items() if adapt_keys is None or k in adapt_keys}
    frozen = {k: v for k, v in params.items() if k not in fast}
    extra = (step,) if with_step else ()
    grads = inner_gradient(lambda f: loss_fn({**frozen, **f}, x, y, *extra), fast,
                           create_graph=not first_order if create_graph is None else create_graph)
    step_lr = lr(step) if callable(lr) else lr
    params = dict(params)
    for name, g in grads.items():
        if first_order:
            g = g.detach()
        rate = step_lr[name] if isinstance(step_lr, Mapping) else step_lr
        # One fused operation (and one node for the outer backward) where the rate is a number.
        params[name] = (params[name] - rate * g if isinstance(rate, Tensor)
                        else torch.add(params[name], g, alpha=-rate))
    return params


def _recomputed_steps(loss_fn: LossFn, params: Params, x: Tensor, y: Tensor, *,
                      lr: float | Mapping[str, Tensor], steps: int,
                      adapt_keys: frozenset[str] | None, every: int) -> Params:
    """``gradient_steps``, second order, in segments of ``every`` steps, each a
    ``_RecomputedSegment``: its differentiable inputs are the weights, the per-weight rates and
    the inputs ``x`` where they take gradients (ANIL's features)."""
    names = list(params)
    rates = dict(lr) if isinstance(lr, Mapping) else {}
    for start in range(0, steps, every):
        count = min(every, steps - start)

        def run(tensors: Sequence[Tensor], create_graph: bool, count: int = count,
                start: int = start) -> tuple[Tensor, ...]:
            weights = dict(zip(names, tensors[:len(names)]))
            step_lr = dict(zip(rates, tensors[len(names):len(names) + len(rates)])) or lr
            inputs = tensors[-1] if len(tensors) > len(names) + len(rates) else x
            for step in range(start, start + count):
                weights = gradient_step(loss_fn, weights, inputs, y, lr=step_lr, step=step,
                                        adapt_keys=adapt_keys, create_graph=create_graph)
            return tuple(weights[n] for n in names)

        tensors = [params[n] for n in names] + list(rates.values())
        if x.requires_grad:
            tensors.append(x)
        params = dict(zip(names, _RecomputedSegment.apply(run, *tensors)))
    return params


class _RecomputedSegment(torch.autograd.Function):
    """A segment of the inner loop whose graph lives only in the outer backward: the forward
    pass runs the steps without it (inner gradients without ``create_graph``: the same values),
    the backward runs them again with it and back-propagates through them (the classic,
    reentrant checkpoint of ``torch.utils.checkpoint``, here over inner steps). Exact: the
    steps are deterministic (BatchNorm on batch statistics, no dropout)."""

    @staticmethod
    def forward(ctx: Any, run: Callable[..., tuple[Tensor, ...]], *tensors: Tensor
                ) -> tuple[Tensor, ...]:
        ctx.run = run
        ctx.save_for_backward(*tensors)
        with torch.enable_grad():
            found = run([t.detach() for t in tensors], False)
        return tuple(t.detach() for t in found)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        wanted = ctx.needs_input_grad[1:]
        inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, wanted)]
        with torch.enable_grad():
            found = ctx.run(inputs, True)
        pairs = [(out, g) for out, g in zip(found, grads) if g is not None and out.requires_grad]
        sources = [t for t in inputs if t.requires_grad]
        computed = iter(torch.autograd.grad([o for o, _ in pairs], sources,
                                            [g for _, g in pairs], allow_unused=True))
        return (None, *(next(computed) if t.requires_grad else None for t in inputs))


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


def fresh_params(module: nn.Module, generator: torch.Generator, prefix: str = "") -> Params:
    """``module``'s freshly initialised weights (every submodule's ``reset_parameters``), drawn
    from ``generator`` and advancing it, as detached copies under keys ``prefix + name``.

    ``reset_parameters`` draws from torch's global generator and takes no other; it runs here
    inside ``fork_rng`` with ``generator``'s state, so the caller's global state is restored
    afterwards, untouched (the values are those the same seed gave the global generator)."""
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(generator.get_state())
        for sub in module.modules():
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
        generator.set_state(torch.get_rng_state())
    return {prefix + name: p.detach().clone() for name, p in module.named_parameters()}

