"""ANIL: its meta-gradient against a plain-autograd unroll that adapts the head only, and learning
Omniglot characters."""

from __future__ import annotations

import pytest
import torch

from learners.anil import ANIL
from learners.backbones import build_backbone, call
from learners.base import Objective
from pipelines.base import TaskBatch
from pipelines.sinusoid import Sinusoid

INNER_LR, STEPS = 0.05, 2


@pytest.mark.parametrize("vectorize", [False, True])
def test_meta_gradient_matches_explicit_unroll(vectorize):
    backbone = build_backbone("mlp", (1,), 1, hidden=(8, 8)).double()
    learner = ANIL(backbone, Objective.for_task_kind("regression"),
                   ANIL.Hyperparameters(inner_lr=INNER_LR, inner_steps=STEPS))
    params = {k: v.double() for k, v in learner.init_params(0).items()}
    batch = Sinusoid(shots=5, queries=7).batch("train", 0, range(3))
    batch = TaskBatch(*(t.double() for t in (batch.support_x, batch.support_y, batch.query_x,
                                             batch.query_y)))
    gradient, _ = learner.batch_gradient(params, batch, vectorize=vectorize)

    mse = torch.nn.functional.mse_loss
    expected = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(len(batch)):
        task = batch[i]
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        fast = dict(leaves)
        for _ in range(STEPS):
            loss = mse(call(backbone, fast, task.support_x), task.support_y)
            head = ["head.weight", "head.bias"]
            grads = torch.autograd.grad(loss, [fast[k] for k in head], create_graph=True)
            fast = {**fast, **{k: fast[k] - INNER_LR * g for k, g in zip(head, grads)}}
        query = mse(call(backbone, fast, task.query_x), task.query_y)
        for k, g in zip(leaves, torch.autograd.grad(query, list(leaves.values()))):
            expected[k] += g
    for k in params:
        torch.testing.assert_close(gradient[k], expected[k], rtol=1e-9, atol=1e-10)
    # The body is not adapted: its fast weights are the initial ones.
    adapted = learner.adapt(params, batch.support_x[0], batch.support_y[0])
    assert all(adapted[k] is params[k] for k in params if k.startswith("body."))
    assert not torch.equal(adapted["head.weight"], params["head.weight"])


def test_learns_held_out_omniglot_alphabets(omniglot_accuracy):
    """60 meta-iterations of 5-way 1-shot (Conv-4, 8 filters) on the small Omniglot set, scored on
    the test split's alphabet (chance 0.2). Measured over training seeds 0-11: 0.44-0.55 (seed
    0: 0.44); the bound leaves room for machines whose kernels round differently."""
    accuracy, _, _ = omniglot_accuracy("anil", {"inner_lr": 0.4}, steps=3)
    assert accuracy > 0.35, f"accuracy {accuracy:.3f}"
