"""SNAIL's sequence model (Mishra et al. 2018): TC blocks of causal dilated convolutions with
gated activations, interleaved with causal key-value attention.

``SequenceModel(sequence, queries)`` runs the causal model over ``sequence`` ([T, features]) and
reads every query ([Q, features]) at position T, right after the whole sequence: each query sees
the sequence and itself, never another query. That equals running ``[*sequence, query]`` once per
query, at the cost of one pass. With ``query_sees_itself=False`` a query's attention covers the
sequence only (its TC blocks still see its own position, as a causal convolution does). Every
block is a pure function of its inputs, called functionally.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class DenseBlock(nn.Module):
    """A causal convolution of kernel 2 and ``dilation``, gated (tanh * sigmoid), its output
    appended to its input: ``out[t] = W [x[t - dilation], x[t]]``, zero before the start."""

    def __init__(self, features: int, filters: int, dilation: int):
        super().__init__()
        self.dilation = dilation
        self.conv = nn.Linear(2 * features, 2 * filters)

    def gated(self, past: Tensor, now: Tensor) -> Tensor:
        f, g = self.conv(torch.cat([past, now], dim=-1)).chunk(2, dim=-1)
        return torch.tanh(f) * torch.sigmoid(g)

    def forward(self, sequence: Tensor, queries: Tensor) -> tuple[Tensor, Tensor]:
        length, d = sequence.shape[0], self.dilation
        past = torch.cat([sequence.new_zeros(min(d, length), sequence.shape[1]),
                          sequence[:max(length - d, 0)]])
        # A query sits at position ``length``: its past element is sequence[length - d].
        query_past = (sequence[length - d].expand_as(queries) if length >= d
                      else torch.zeros_like(queries))
        return (torch.cat([sequence, self.gated(past, sequence)], dim=-1),
                torch.cat([queries, self.gated(query_past, queries)], dim=-1))


class TCBlock(nn.Module):
    """Dense blocks of doubling dilation 1, 2, 4, ...: ceil(log2 length) of them, so the last
    position's receptive field covers a sequence of ``length``."""

    def __init__(self, features: int, filters: int, length: int):
        super().__init__()
        self.blocks = nn.ModuleList()
        for i in range(max(1, math.ceil(math.log2(length)))):
            self.blocks.append(DenseBlock(features, filters, 2 ** i))
            features += filters
        self.out_features = features

    def forward(self, sequence: Tensor, queries: Tensor) -> tuple[Tensor, Tensor]:
        for block in self.blocks:
            sequence, queries = block(sequence, queries)
        return sequence, queries


class AttentionBlock(nn.Module):
    """Causal single-head key-value attention, its read appended to its input. Each sequence
    position attends to itself and the positions before it; each query to the whole sequence, and
    to itself when ``query_sees_itself``."""

    def __init__(self, features: int, key_size: int, value_size: int, *,
                 query_sees_itself: bool = True):
        super().__init__()
        self.key_size = key_size
        self.query_sees_itself = query_sees_itself
        self.query = nn.Linear(features, key_size)
        self.key = nn.Linear(features, key_size)
        self.value = nn.Linear(features, value_size)
        self.out_features = features + value_size

    def forward(self, sequence: Tensor, queries: Tensor) -> tuple[Tensor, Tensor]:
        length, scale = sequence.shape[0], math.sqrt(self.key_size)
        keys, values = self.key(sequence), self.value(sequence)
        logits = self.query(sequence) @ keys.T / scale
        causal = torch.ones(length, length, dtype=torch.bool, device=sequence.device).tril()
        read = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1) @ values
        asked = self.query(queries)
        if self.query_sees_itself:
            own_key, own_value = self.key(queries), self.value(queries)
            query_logits = torch.cat([asked @ keys.T, (asked * own_key).sum(-1, keepdim=True)],
                                     dim=-1) / scale
            weights = torch.softmax(query_logits, dim=-1)
            query_read = weights[:, :length] @ values + weights[:, length:] * own_value
        else:
            query_read = torch.softmax(asked @ keys.T / scale, dim=-1) @ values
        return (torch.cat([sequence, read], dim=-1), torch.cat([queries, query_read], dim=-1))


class SequenceModel(nn.Module):
    """The paper's Omniglot stack: attention, TC, attention, TC, attention, then a linear layer
    (the paper's 1x1 convolution) to ``classes`` logits at every position."""

    def __init__(self, features: int, classes: int, *, length: int, filters: int,
                 key_size: int, value_size: int, query_sees_itself: bool = True):
        super().__init__()
        blocks: list[nn.Module] = []
        for i in range(3):
            attention = AttentionBlock(features, key_size, value_size,
                                       query_sees_itself=query_sees_itself)
            blocks.append(attention)
            features = attention.out_features
            if i < 2:
                tc = TCBlock(features, filters, length)
                blocks.append(tc)
                features = tc.out_features
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Linear(features, classes)

    def forward(self, sequence: Tensor, queries: Tensor) -> tuple[Tensor, Tensor]:
        for block in self.blocks:
            sequence, queries = block(sequence, queries)
        return self.out(sequence), self.out(queries)
