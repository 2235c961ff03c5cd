"""Second-order meta-gradients on Conv-4 in the CPU autograd loop: at 1, 5 and 10 inner steps,
the loop's modules (``backbones.Conv2d``, ``BatchNorm2d`` and ``MaxPool2d``, with their own
second derivatives) give the stock ``nn`` modules' meta-gradient, and
``training.inner_checkpointing`` (segments recomputed in the outer backward) gives the plain
path's, while keeping for the backward what one segment needs instead of every step's
activations."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

import learners.backbones as backbones
from learners.functional import plain_autograd
from orchestrator.config import ModelSection
from orchestrator.training.factory import build_learner
from pipelines.base import TaskBatch
from meta_training import random_episodes

# MAML at every step count; Meta-SGD (learned rates in the segments' inputs) and ANIL (the
# features, which depend on the body, in them) at one.
CASES = [("maml", 1), ("maml", 5), ("maml", 10), ("metasgd", 5), ("anil", 5)]
IDS = [f"{name}-{steps}" for name, steps in CASES]


def conv4(name: str, steps: int, *, dtype: torch.dtype = torch.float64):
    """A 4-filter Conv-4 learner in ``dtype``, its meta-parameters and two random episodes. An
    inner rate of 0.1 makes every step move the weights (and so the second-order terms) visibly."""
    model = ModelSection.model_validate({"backbone": "conv4", "filters": 4})
    learner = build_learner(model, name, {"inner_steps": steps, "inner_lr": 0.1},
                            kind="classification", input_shape=(1, 28, 28), output_size=5)
    learner.backbone.to(dtype)
    params = {k: v.to(dtype) for k, v in learner.init_params(0).items()}
    batch = random_episodes(1)
    batch = TaskBatch(batch.support_x.to(dtype), batch.support_y, batch.query_x.to(dtype),
                      batch.query_y)
    return learner, params, batch


def relative(a: dict, b: dict) -> float:
    difference = torch.cat([(a[k] - b[k]).flatten() for k in b]).norm()
    return float(difference / torch.cat([b[k].flatten() for k in b]).norm())


@pytest.mark.parametrize("name, steps", CASES, ids=IDS)
def test_meta_gradient_equals_the_stock_modules(name, steps, monkeypatch):
    learner, params, batch = conv4(name, steps)
    fast, fast_stats = learner.batch_gradient(params, batch)
    for cls, stock in ((backbones.Conv2d, nn.Conv2d), (backbones.BatchNorm2d, nn.BatchNorm2d),
                       (backbones.MaxPool2d, nn.MaxPool2d)):
        monkeypatch.setattr(cls, "forward", stock.forward)
    reference, stats = learner.batch_gradient(params, batch)
    # The same kernels forward and backward; the second derivatives by other formulas, equal
    # in exact arithmetic: in float64 they agree to rounding.
    assert relative(fast, reference) < 1e-10
    assert fast_stats == pytest.approx(stats, rel=1e-12)


def test_second_order_terms_reach_the_meta_gradient():
    """The comparison above can fail: without the inner gradients' graph (first order) the
    meta-gradient differs from the stock modules' by far more than rounding."""
    learner, params, batch = conv4("maml", 5)
    second, _ = learner.batch_gradient(params, batch)
    learner.first_order = True
    first, _ = learner.batch_gradient(params, batch)
    assert relative(first, second) > 1e-3


@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("name, steps", CASES, ids=IDS)
def test_inner_checkpointing_gives_the_plain_meta_gradient(name, steps, every):
    learner, params, batch = conv4(name, steps)
    plain, plain_stats = learner.batch_gradient(params, batch)
    learner.inner_checkpointing = every
    recomputed, stats = learner.batch_gradient(params, batch)
    assert relative(recomputed, plain) < 1e-12
    assert stats == plain_stats


def held_for_backward(learner, params, batch, steps: int) -> int:
    """Bytes the autograd graph of one task's query loss holds for the outer backward once the
    forward pass is done: saved tensors still alive then (those of the inner gradients' own,
    finished graphs are gone), each storage counted once."""
    saved: dict[int, tuple[weakref.ref, int]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = (weakref.ref(tensor), storage.nbytes())
        return tensor

    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    with torch.enable_grad(), plain_autograd(), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        task = batch[0]
        adapted = learner.adapt(leaves, task.support_x, task.support_y, ways=5, steps=steps)
        loss = learner.objective.loss(learner.predict(leaves, adapted, task.query_x),
                                      task.query_y)
    held = sum(size for ref, size in saved.values() if ref() is not None)
    del loss
    return held


def test_inner_checkpointing_holds_one_segment_not_every_step():
    learner, params, batch = conv4("maml", 10, dtype=torch.float32)
    plain = {steps: held_for_backward(learner, params, batch, steps) for steps in (1, 2, 10)}
    learner.inner_checkpointing = 1
    recomputed = {steps: held_for_backward(learner, params, batch, steps) for steps in (1, 10)}
    weights = sum(v.numel() * v.element_size() for v in params.values())
    step = plain[2] - plain[1]  # one step's support activations and inner-gradient graph
    assert plain[10] - plain[1] == pytest.approx(9 * step, rel=0.01)
    # Recomputed: the query pass and each segment's starting weights, whatever the steps
    # (less than the plain path's single step: not even that step's graph is kept).
    assert recomputed[10] - recomputed[1] <= 9 * weights
    assert recomputed[10] < plain[1]
