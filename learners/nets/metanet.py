"""The parts of Meta Networks (Munkhdalai and Yu 2017) that are networks, not algorithm.

- ``augmented``: a backbone run with layer augmentation: every convolution or linear layer is
  computed twice, with its slow weight and with a fast weight, each through the layer's own
  BatchNorm and ReLU, and the two outputs are summed before pooling (the output layer: slow
  logits plus fast logits). Fast paths have no bias, as in the authors' code.
- ``CoordinateMLP`` (the paper's m) and ``CoordinateLSTM`` (d): meta-learners applied to every
  coordinate of a loss gradient alike, after the log/sign preprocessing of Andrychowicz et al.
  2016 that the authors use (k = 7); each maps gradients to fast weights of the same shape.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learners.nets.lstm import lstm_cell, preprocess

Params = dict[str, Tensor]
WEIGHTED = (nn.Conv2d, nn.Linear)
UNIT = (nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU)
PREPROCESS_K = 7.0  # the authors' k of the gradient preprocessing


def layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The leaf modules of a chain backbone (backbones.MLP, backbones.Conv4) in forward order."""
    return [(name, m) for name, m in net.named_modules() if not list(m.children())]


def fast_names(net: nn.Module) -> list[str]:
    """The weights that get fast weights: every convolution and linear layer's weight."""
    return [f"{name}.weight" for name, m in layers(net) if isinstance(m, WEIGHTED)]


def _units(net: nn.Module) -> Iterator[list[tuple[str, nn.Module]]]:
    """Group the chain into units: a weighted layer with the BatchNorm and ReLU after it, or one
    other layer (pooling, flattening) on its own."""
    chain = layers(net)
    i = 0
    while i < len(chain):
        j = i + 1
        if isinstance(chain[i][1], WEIGHTED):
            while j < len(chain) and isinstance(chain[j][1], UNIT):
                j += 1
        yield chain[i:j]
        i = j


def _run(unit: list[tuple[str, nn.Module]], params: Params, x: Tensor, weight: Tensor,
         bias: Tensor | None) -> Tensor:
    for name, module in unit:
        if isinstance(module, nn.Conv2d):
            x = F.conv2d(x, weight, bias, module.stride, module.padding)
        elif isinstance(module, nn.Linear):
            x = F.linear(x, weight, bias)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            x = F.batch_norm(x, None, None, params[f"{name}.weight"], params[f"{name}.bias"],
                             training=True, eps=module.eps)
        else:
            x = F.relu(x)
    return x


def augmented(net: nn.Module, slow: Params, fast: Params | None, x: Tensor) -> Tensor:
    """``net`` on ``x`` with slow weights ``slow`` plus, where ``fast`` has an entry, a fast-weight
    path through the same layer, summed (the paper's layer augmentation)."""
    for unit in _units(net):
        name, module = unit[0]
        if not isinstance(module, WEIGHTED):
            x = module(x)
            continue
        key = f"{name}.weight"
        out = _run(unit, slow, x, slow[key], slow.get(f"{name}.bias"))
        if fast is not None and key in fast:
            out = out + _run(unit, slow, x, fast[key], None)
        x = out
    return x


class CoordinateMLP(nn.Module):
    """m: 2 -> hidden -> hidden -> 1 with ReLU, for every gradient coordinate alike."""

    def __init__(self, hidden: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                    nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, gradients: Tensor) -> Tensor:
        return self.layers(preprocess(gradients, PREPROCESS_K)).squeeze(-1)


class CoordinateLSTM(nn.Module):
    """d: an LSTM read over a sequence of gradients ([steps, coordinates]), one state per
    coordinate; its last output, through a linear layer, is the fast weight."""

    def __init__(self, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.gates = nn.Linear(2 + hidden, 4 * hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, gradients: Tensor) -> Tensor:
        inputs = preprocess(gradients, PREPROCESS_K)
        h = inputs.new_zeros(*inputs.shape[1:-1], self.hidden)
        c = torch.zeros_like(h)
        for step in range(inputs.shape[0]):
            h, c = lstm_cell(self.gates(torch.cat([inputs[step], h], dim=-1)), c)
        return self.out(h).squeeze(-1)
