"""Matching Networks: cosine attention over the support set, and the full context embeddings."""

from __future__ import annotations

import torch
from torch import nn

from learners.backbones import build_backbone
from learners.base import Objective
from learners.matching import Matching
from learners.functional import entries
from learners.nets.metric import encode_support, lstm_step


def make(*, fce: bool, steps: int = 3) -> Matching:
    backbone = build_backbone("mlp", (16,), None, hidden=(12,))
    return Matching(backbone, Objective.for_task_kind("classification"),
                    Matching.Hyperparameters(fce=fce, fce_steps=steps))


def test_outputs_are_log_attention_weighted_labels():
    learner = make(fce=False)
    params = learner.init_params(0)
    support_x, query_x = torch.randn(6, 16), torch.randn(4, 16)
    support_y = torch.tensor([2, 0, 1, 0, 2, 1])
    outputs = learner.predict(params, learner.adapt(params, support_x, support_y), query_x)
    support, queries = learner.embed(params, support_x), learner.embed(params, query_x)
    cosine = torch.stack([torch.stack([nn.functional.cosine_similarity(q, s, dim=0)
                                       for s in support]) for q in queries])
    expected = (torch.softmax(cosine, dim=-1) @ nn.functional.one_hot(support_y, 3).float()).log()
    torch.testing.assert_close(outputs, expected, rtol=1e-4, atol=1e-5)
    assert set(params) == {k for k, _ in learner.backbone.named_parameters()}


def test_full_context_embeddings_are_a_bidirectional_lstm_and_an_attention_lstm():
    learner = make(fce=True)
    params = learner.init_params(0)
    fce = entries(params, "fce.")
    embeddings = torch.randn(5, 12)
    # g: the same as torch's bidirectional LSTM with these weights, plus the skip connection.
    reference = nn.LSTM(12, 12, bidirectional=True)
    with torch.no_grad():
        for direction, suffix in (("support_forward", ""), ("support_backward", "_reverse")):
            for weight in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(reference, f"{weight}_l0{suffix}").copy_(fce[f"{direction}.{weight}"])
        states, _ = reference(embeddings)
    torch.testing.assert_close(encode_support(fce, embeddings),
                               embeddings + states[:, :12] + states[:, 12:], rtol=1e-4, atol=1e-5)
    # lstm_step is nn.LSTMCell's step.
    cell = nn.LSTMCell(24, 12)
    x, h, c = torch.randn(3, 24), torch.randn(3, 12), torch.randn(3, 12)
    with torch.no_grad():
        expected = cell(x, (h, c))
    got = lstm_step({k: v.detach() for k, v in cell.named_parameters()}, x, h, c)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    # f reads the support set K times: the number of steps changes the outputs.
    support_x, support_y, query_x = torch.randn(5, 16), torch.arange(5), torch.randn(3, 16)
    one, three = (make(fce=True, steps=k) for k in (1, 3))
    outputs = [m.predict(params, m.adapt(params, support_x, support_y), query_x) for m in (one, three)]
    assert not torch.allclose(*outputs)
    assert torch.allclose(outputs[1].exp().sum(-1), torch.ones(3))
