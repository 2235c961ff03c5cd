"""MAML++'s per-step BatchNorm: a functional forward pass over a shared backbone's weights.

The shared backbones keep one BatchNorm weight and bias per layer and no running statistics.
MAML++ (Antoniou, Edwards and Storkey, 2019) keeps, per BatchNorm layer, one row of weight and
bias for each number of inner updates the fast weights have had (its running statistics are never
read: ``learners.mamlpp``). Here those rows live in the meta-parameter dict under the layer's own
keys (``body.0.1.weight`` is ``[rows, channels]``); ``row_view`` picks one row, and ``forward``
runs the backbone's modules in order with a parameter dict in place of their own weights (pure,
so it runs under ``vmap``).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.functional import batch_norm

from learners.backbones import ConvBlock
from learners.functional import entries

Params = dict[str, Tensor]
WEIGHT, BIAS = "weight", "bias"
EPS = 1e-5


def norm_layers(backbone: nn.Module) -> list[str]:
    """Key prefixes (``body.0.1.``) of the backbone's BatchNorm layers."""
    return [f"{name}." for name, module in backbone.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)]


def per_step(weights: Params, layers: list[str], rows: int) -> Params:
    """``weights`` with every BatchNorm layer's weight and bias repeated ``rows`` times."""
    out = dict(weights)
    for layer in layers:
        for key in (WEIGHT, BIAS):
            out[layer + key] = weights[layer + key].unsqueeze(0).repeat(rows, 1)
    return out


def row_view(params: Params, layers: list[str], row: int) -> Params:
    """The weights with each per-step BatchNorm tensor replaced by its row ``row`` (the last row
    for later steps, when evaluation takes more steps than training did)."""
    out = dict(params)
    for layer in layers:
        for key in (WEIGHT, BIAS):
            rows = params[layer + key]
            out[layer + key] = rows[min(row, len(rows) - 1)]
    return out


def forward(backbone: nn.Module, view: Params, x: Tensor) -> Tensor:
    """The backbone (``body`` then ``head``) on ``x`` with a ``row_view``'s weights. BatchNorm
    normalises with the batch's own statistics (in training and evaluation alike, see
    ``learners.mamlpp``)."""

    def run(module: nn.Module, prefix: str, h: Tensor) -> Tensor:
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            if isinstance(module, ConvBlock):  # pools before its ReLU: the same values, cheaper
                children = [children[i] for i in ConvBlock.FORWARD_ORDER]
            for name, child in children:
                h = run(child, f"{prefix}{name}.", h)
            return h
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return batch_norm(h, None, None, view[prefix + WEIGHT], view[prefix + BIAS],
                              training=True, eps=EPS)
        return functional_call(module, entries(view, prefix), (h,))

    return run(backbone.head, "head.", run(backbone.body, "body.", x))
