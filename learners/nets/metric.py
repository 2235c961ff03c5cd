"""The extra networks of the metric learners, called as pure functions of parameter dicts.

Matching Networks' full context embeddings (two LSTMs), Relation Networks' relation module and the
Siamese verification head. The ``nn.Module``s here only hold weights and their initialisation;
the learners call them through ``learners.backbones.call`` or, for the LSTMs, through
``lstm_step``, which is written over the weight tensors so that it runs under ``vmap``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from learners.functional import Params, entries
from learners.nets.lstm import lstm_cell


# -- Matching Networks: full context embeddings (Vinyals et al. 2016, appendix A) --------------

class FullContextEmbedding(nn.Module):
    """The weights of g (a bidirectional LSTM over the support embeddings) and f (an attention
    LSTM that reads the support set), all as wide as the embedding so the skip connections add."""

    def __init__(self, width: int):
        super().__init__()
        self.support_forward = nn.LSTMCell(width, width)
        self.support_backward = nn.LSTMCell(width, width)
        # Input [f'(x), r]: the paper's LSTM state is the concatenation [h, r]; its gates are
        # linear in it, so feeding r beside the input computes the same gates.
        self.read = nn.LSTMCell(2 * width, width)


def lstm_step(params: Params, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """One step of an ``nn.LSTMCell`` (gates i, f, g, o) over its weight entries in ``params``."""
    gates = (x @ params["weight_ih"].T + params["bias_ih"]
             + h @ params["weight_hh"].T + params["bias_hh"])
    return lstm_cell(gates, c)


def encode_support(params: Params, embeddings: Tensor) -> Tensor:
    """g(x_i, S) = g'(x_i) + forward state + backward state of a bidirectional LSTM run over the
    support embeddings ``[support, width]`` in the order given. ``params``: FCE entries."""

    def run(cell: Params, sequence: list[Tensor]) -> list[Tensor]:
        h = c = torch.zeros_like(sequence[0])
        states = []
        for x in sequence:
            h, c = lstm_step(cell, x, h, c)
            states.append(h)
        return states

    items = list(embeddings.unbind(0))
    forward = run(entries(params, "support_forward."), items)
    backward = run(entries(params, "support_backward."), items[::-1])[::-1]
    return embeddings + torch.stack(forward) + torch.stack(backward)


def encode_queries(params: Params, queries: Tensor, support: Tensor, steps: int) -> Tensor:
    """f(x, S): ``steps`` reads of an attention LSTM over the encoded support ``[support, width]``
    for each query embedding ``[queries, width]``; the state starts at the query embedding and
    every step adds it back (the skip connection), as in the paper's appendix."""
    cell = entries(params, "read.")
    h, c = queries, torch.zeros_like(queries)
    for _ in range(steps):
        attention = torch.softmax(h @ support.T, dim=-1)
        h, c = lstm_step(cell, torch.cat([queries, attention @ support], dim=-1), h, c)
        h = h + queries
    return h


# -- Relation Networks: the relation module (Sung et al. 2018, figure 2) -----------------------

def relation_block(in_channels: int, out_channels: int, *, pool: bool) -> nn.Sequential:
    """Conv 3x3, BatchNorm, ReLU, and a 2x2 max-pool if ``pool``."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                               nn.BatchNorm2d(out_channels, track_running_stats=False), nn.ReLU()]
    return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)


def dense_block(in_features: int, out_features: int) -> list[nn.Module]:
    """The vector counterpart of a conv block: Linear (no bias), BatchNorm, ReLU."""
    return [nn.Linear(in_features, out_features, bias=False),
            nn.BatchNorm1d(out_features, track_running_stats=False), nn.ReLU()]


def relation_module(feature_shape: Sequence[int], hidden: int) -> nn.Sequential:
    """The relation module g_phi on a concatenated (class, query) pair, ending in one relation
    logit: two conv blocks and two fully connected layers on [C, H, W] feature maps (a block
    pools only while the maps are at least 2x2: the paper's are 5x5, Conv-4's on 28x28 images
    1x1); on vector embeddings (the mlp backbone) two fully connected ReLU layers take the
    blocks' place."""
    if len(feature_shape) == 1:
        (width,) = feature_shape
        return nn.Sequential(*dense_block(2 * width, width), *dense_block(width, width),
                             nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    channels, height, width = feature_shape
    blocks: list[nn.Module] = []
    for in_channels in (2 * channels, channels):
        pool = min(height, width) >= 2
        blocks.append(relation_block(in_channels, channels, pool=pool))
        if pool:
            height, width = height // 2, width // 2
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(channels * height * width, hidden),
                         nn.ReLU(), nn.Linear(hidden, 1))

