"""MAML's meta-gradient against an independent computation, and its first-order relatives."""

from __future__ import annotations

import pytest
import torch

from learners.backbones import build_backbone, call
from learners.base import Objective
from learners.registry import learner_class
from pipelines.base import TaskBatch
from pipelines.sinusoid import Sinusoid

INNER_LR, STEPS = 0.05, 2


def make(name: str):
    torch.manual_seed(0)
    backbone = build_backbone("mlp", (1,), 1, hidden=(8, 8)).double()
    cls = learner_class(name)
    learner = cls(backbone, Objective.for_task_kind("regression"),
                  cls.Hyperparameters(inner_lr=INNER_LR, inner_steps=STEPS))
    params = {k: v.double() for k, v in learner.init_params(0).items()}
    batch = Sinusoid(shots=5, queries=7).batch("train", 0, range(4))
    batch = TaskBatch(*(t.double() for t in (batch.support_x, batch.support_y, batch.query_x,
                                             batch.query_y)))
    return learner, params, batch


def explicit_gradient(learner, params, batch, *, second_order: bool):
    """Plain autograd, no torch.func: unroll the inner loop with create_graph."""
    mse = torch.nn.functional.mse_loss
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(len(batch)):
        task = batch[i]
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        fast = leaves
        for _ in range(STEPS):
            loss = mse(call(learner.backbone, fast, task.support_x), task.support_y)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=second_order)
            fast = {k: v - INNER_LR * g for (k, v), g in zip(fast.items(), grads)}
        if not second_order:
            fast = {k: v.detach().requires_grad_(True) for k, v in fast.items()}
        query = mse(call(learner.backbone, fast, task.query_x), task.query_y)
        wrt = leaves if second_order else fast
        for k, g in zip(wrt, torch.autograd.grad(query, list(wrt.values()))):
            total[k] += g
    return total


def finite_difference(learner, params, task, name: str, index: tuple[int, ...], eps: float = 1e-6):
    def query_loss(p):
        adapted = learner.adapt(p, task.support_x, task.support_y)
        return float(learner.objective.loss(learner.predict(p, adapted, task.query_x), task.query_y))

    plus = {k: v.clone() for k, v in params.items()}
    minus = {k: v.clone() for k, v in params.items()}
    plus[name][index] += eps
    minus[name][index] -= eps
    return (query_loss(plus) - query_loss(minus)) / (2 * eps)


@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("algorithm, second_order", [("maml", True), ("fomaml", False)])
def test_matches_explicit_autograd_unroll(algorithm, second_order, vectorize):
    learner, params, batch = make(algorithm)
    gradient, _ = learner.batch_gradient(params, batch, vectorize=vectorize)
    expected = explicit_gradient(learner, params, batch, second_order=second_order)
    for k in params:
        torch.testing.assert_close(gradient[k], expected[k], rtol=1e-9, atol=1e-10)


def test_maml_matches_finite_differences():
    learner, params, batch = make("maml")
    task = batch[0]
    gradient, _, _ = learner.task_gradient(params, task)
    for name, index in [("body.0.weight", (3, 0)), ("body.2.bias", (1,)), ("head.weight", (0, 5))]:
        numeric = finite_difference(learner, params, task, name, index)
        assert gradient[name][index].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def test_second_order_terms_matter():
    """If MAML silently dropped second-order terms it would equal FOMAML."""
    learner, params, batch = make("maml")
    first = explicit_gradient(learner, params, batch, second_order=False)
    gradient, _ = learner.batch_gradient(params, batch)
    assert max((gradient[k] - first[k]).abs().max() for k in params) > 1e-4


def test_reptile_direction_is_initial_minus_adapted():
    learner, params, batch = make("reptile")
    gradient, _ = learner.batch_gradient(params, batch)
    expected = {k: torch.zeros_like(v) for k, v in params.items()}
    mse = torch.nn.functional.mse_loss
    for i in range(len(batch)):
        task = batch[i]
        x, y = torch.cat([task.support_x, task.query_x]), torch.cat([task.support_y, task.query_y])
        fast = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        for _ in range(STEPS):
            grads = torch.autograd.grad(mse(call(learner.backbone, fast, x), y), list(fast.values()))
            fast = {k: (v - INNER_LR * g).detach().requires_grad_(True) for (k, v), g in zip(fast.items(), grads)}
        for k in params:
            expected[k] += params[k] - fast[k].detach()
    for k in params:
        torch.testing.assert_close(gradient[k], expected[k], rtol=1e-9, atol=1e-10)
