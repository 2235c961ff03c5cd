"""The CPU meta-step (``Learner.autograd_batch_gradient``) against torch.func, on Conv-4.

The contract tests compare the per-task loop with ``vmap`` on an MLP, where memory order plays no
part. Here, on Omniglot-shaped episodes and a Conv-4, the two things the CPU loop changes are
checked apart: plain autograd instead of torch.func's nested transform gives the same
meta-gradient to float rounding, and channels-last image batches round differently -- BatchNorm
over five support images amplifies that -- but stay within a tenth of a percent.
"""

from __future__ import annotations

import pytest
import torch

import learners.base as base
from learners.backbones import ConvBlock
from orchestrator.config import ModelSection
from orchestrator.training.factory import build_learner
from meta_training import random_episodes

LEARNERS = [("maml", {}), ("fomaml", {}), ("metasgd", {}), ("anil", {}), ("mamlpp", {}),
            ("maml", {"head": "zero"}), ("protonet", {}), ("relation", {}), ("sca", {})]


def relative(a: dict, b: dict) -> float:
    difference = torch.cat([(a[k] - b[k]).flatten() for k in b]).norm()
    return float(difference / torch.cat([b[k].flatten() for k in b]).norm())


@pytest.mark.parametrize("name, knobs", LEARNERS, ids=[f"{n}{k}" for n, k in LEARNERS])
def test_cpu_loop_equals_torch_func(name, knobs, monkeypatch):
    model = ModelSection.model_validate({"backbone": "conv4", "filters": 16})
    learner = build_learner(model, name, knobs, kind="classification", input_shape=(1, 28, 28),
                            output_size=5)
    learner.progress = 0.5  # MAML++: second order, last-step loss
    assert learner.uses_autograd_loop()
    params, batch = learner.init_params(0), random_episodes()
    reference, _ = learner.batch_gradient(params, batch, vectorize=True)  # torch.func
    fast, _ = learner.batch_gradient(params, batch, vectorize=False, progress=0.5)
    assert relative(fast, reference) < 1e-3
    monkeypatch.setattr(base, "channels_last", lambda x: x)
    plain, _ = learner.batch_gradient(params, batch, vectorize=False, progress=0.5)
    assert relative(plain, reference) < 1e-5


def test_pooling_before_relu_is_exact():
    """Conv-4 blocks pool before their ReLU: the same values and gradients as the usual order."""
    block = ConvBlock(torch.nn.Conv2d(1, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4),
                      torch.nn.ReLU(), torch.nn.MaxPool2d(2))
    x = torch.randn(6, 1, 10, 10, requires_grad=True)
    usual = block[3](block[2](block[1](block[0](x))))
    (gradient_usual,) = torch.autograd.grad(usual.square().sum(), x)
    swapped = block(x)
    (gradient_swapped,) = torch.autograd.grad(swapped.square().sum(), x)
    assert torch.equal(usual, swapped) and torch.equal(gradient_usual, gradient_swapped)
