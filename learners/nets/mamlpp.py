"""MAML++'s per-step BatchNorm: a functional forward pass over a shared backbone's weights.

The shared backbones keep one BatchNorm weight and bias per layer and no running statistics.
MAML++ (Antoniou, Edwards and Storkey, 2019) keeps, per BatchNorm layer, one row of weight, bias
and running statistics for each number of inner updates the fast weights have had. Here those
rows live in the meta-parameter dict under the layer's own keys (``body.0.1.weight`` is
``[rows, channels]``) beside ``body.0.1.running_mean`` and ``body.0.1.running_var``; ``row_view``
picks one row, and ``forward`` runs the backbone's modules in order with a parameter dict in
place of their own weights (pure, so it runs under ``vmap``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.functional import batch_norm

from learners.backbones import ConvBlock
from learners.functional import entries, in_plain_autograd

Params = dict[str, Tensor]
WEIGHT, BIAS, MEAN, VAR = "weight", "bias", "running_mean", "running_var"
EPS = 1e-5


def norm_layers(backbone: nn.Module) -> list[str]:
    """Key prefixes (``body.0.1.``) of the backbone's BatchNorm layers."""
    return [f"{name}." for name, module in backbone.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)]


def per_step(weights: Params, layers: list[str], rows: int) -> Params:
    """``weights`` with every BatchNorm layer's weight and bias repeated ``rows`` times, and
    running statistics (mean 0, variance 1, as PyTorch starts them) for each row."""
    out = dict(weights)
    for layer in layers:
        for key in (WEIGHT, BIAS):
            out[layer + key] = weights[layer + key].unsqueeze(0).repeat(rows, 1)
        out[layer + MEAN] = torch.zeros_like(out[layer + WEIGHT])
        out[layer + VAR] = torch.ones_like(out[layer + WEIGHT])
    return out


def row_view(params: Params, layers: list[str], row: int) -> Params:
    """The weights with each per-step BatchNorm tensor replaced by its row ``row`` (the last row
    for later steps, when evaluation takes more steps than training did)."""
    out = dict(params)
    for layer in layers:
        for key in (WEIGHT, BIAS, MEAN, VAR):
            rows = params[layer + key]
            out[layer + key] = rows[min(row, len(rows) - 1)]
    return out


def forward(backbone: nn.Module, view: Params, x: Tensor, *,
            moments: dict[str, tuple[Tensor, Tensor]] | None = None) -> Tensor:
    """The backbone (``body`` then ``head``) on ``x`` with a ``row_view``'s weights. BatchNorm
    normalises with the batch's own statistics (in training and evaluation alike, see
    ``learners.mamlpp``); ``moments``, when given, receives each BatchNorm input's batch mean and
    unbiased variance, detached, keyed by layer prefix."""

    def run(module: nn.Module, prefix: str, h: Tensor) -> Tensor:
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            if isinstance(module, ConvBlock):  # pools before its ReLU: the same values, cheaper
                children = [children[i] for i in ConvBlock.FORWARD_ORDER]
            for name, child in children:
                h = run(child, f"{prefix}{name}.", h)
            return h
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if moments is not None and in_plain_autograd():
                # Outside torch.func, BatchNorm's own kernel reports the batch moments: with
                # momentum 1 it writes them into the buffers it is given, at no extra cost.
                mean, variance = h.new_zeros(h.shape[1]), h.new_ones(h.shape[1])
                out = batch_norm(h, mean, variance, view[prefix + WEIGHT], view[prefix + BIAS],
                                 training=True, momentum=1.0, eps=EPS)
                moments[prefix] = (mean, variance)
                return out
            if moments is not None:
                # One row per position, one column per channel (a view of channels-last maps),
                # and the variance in two passes of sums: torch's var over dims (0, 2, 3) took a
                # fifth of a CPU meta-step, against a thirtieth for this.
                flat = h.detach().movedim(1, -1).reshape(-1, h.shape[1])
                mean = flat.mean(dim=0)
                variance = (flat - mean).square().sum(dim=0) / (flat.shape[0] - 1)
                moments[prefix] = (mean, variance)
            return batch_norm(h, None, None, view[prefix + WEIGHT], view[prefix + BIAS],
                              training=True, eps=EPS)
        return functional_call(module, entries(view, prefix), (h,))

    return run(backbone.head, "head.", run(backbone.body, "body.", x))
