"""The two LSTM pieces that several learners' networks share, as pure tensor functions.

``lstm_cell`` is the LSTM cell's update from its pre-activation gates, whatever computed them:
Matching Networks' ``nn.LSTMCell`` weights (``nets.metric``), Meta Networks' coordinate-wise LSTM d
(``nets.metanet``) and the first layer of Ravi and Larochelle's meta-learner (``nets.meta_lstm``).
``preprocess`` is the log/sign preprocessing of Andrychowicz et al. (2016) that the last two apply
to the gradients (and losses) they read.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def lstm_cell(gates: Tensor, c: Tensor, *, dim: int = -1) -> tuple[Tensor, Tensor]:
    """The new hidden and cell state ``(h, c)`` from the gates (input, forget, cell, output --
    ``nn.LSTMCell``'s order) stacked along ``dim`` and the previous cell state ``c``."""
    i, f, g, o = gates.chunk(4, dim=dim)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def preprocess(x: Tensor, p: float) -> Tensor:
    """The log/sign preprocessing of gradients and losses: ``x`` -> ``[..., 2]``.

    (log|x| / p, sign x) where |x| >= e^-p, else (-1, e^p x): inputs of very different scales
    become comparable. The clamp keeps the unused branch finite so that gradients through
    ``torch.where`` stay finite too."""
    big = x.abs() >= math.exp(-p)
    magnitude = torch.log(x.abs().clamp(min=math.exp(-p))) / p
    first = torch.where(big, magnitude, -torch.ones_like(x))
    second = torch.where(big, torch.sign(x), math.exp(p) * x)
    return torch.stack([first, second], dim=-1)
