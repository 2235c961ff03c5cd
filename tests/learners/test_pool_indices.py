"""The CPU autograd loop's max-pool keeps only its argmax indices (``backbones.MaxPool2d``), and
Conv-4's ReLU runs in place after it: the meta-gradient is the one the stock ``nn.MaxPool2d``
and an out-of-place ReLU give, second order included, and a forward pass holds less for its
backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import learners.backbones as backbones
from learners.functional import plain_autograd
from orchestrator.config import ModelSection
from orchestrator.training.factory import build_learner
from meta_training import random_episodes

# Two inner steps: the pool's backward is itself differentiated (second order) at every step.
LEARNERS = [("maml", {"inner_steps": 2}), ("mamlpp", {}), ("anil", {}), ("metasgd", {})]


def learner_for(name: str, knobs: dict):
    model = ModelSection.model_validate({"backbone": "conv4", "filters": 16})
    learner = build_learner(model, name, knobs, kind="classification", input_shape=(1, 28, 28),
                            output_size=5)
    learner.progress = 0.5  # MAML++: second order
    return learner


def stock(monkeypatch, backbone: nn.Module) -> None:
    """Today's modules: ``nn.MaxPool2d``'s own forward, a ReLU that writes a new tensor."""
    monkeypatch.setattr(backbones.MaxPool2d, "forward", nn.MaxPool2d.forward)
    for module in backbone.modules():
        if isinstance(module, nn.ReLU):
            monkeypatch.setattr(module, "inplace", False)


@pytest.mark.parametrize("name, knobs", LEARNERS, ids=[n for n, _ in LEARNERS])
def test_meta_gradient_equals_stock_pooling(name, knobs, monkeypatch):
    learner = learner_for(name, knobs)
    params, batch = learner.init_params(0), random_episodes()
    fast, fast_stats = learner.batch_gradient(params, batch, progress=0.5)
    stock(monkeypatch, learner.backbone)
    reference, stats = learner.batch_gradient(params, batch, progress=0.5)
    assert fast.keys() == reference.keys()
    difference = torch.cat([(fast[k] - reference[k]).flatten() for k in reference]).norm()
    # The same values through the same kernels but the pool's backward (max_unpool2d, whose
    # own derivative is the same gather): equal to float rounding.
    assert float(difference / torch.cat([v.flatten() for v in reference.values()]).norm()) < 1e-5
    assert fast_stats == pytest.approx(stats, rel=1e-6)


def saved_bytes(backbone: nn.Module, x: torch.Tensor) -> int:
    """Bytes a forward pass under the CPU loop hands autograd to keep for its backward."""
    kept = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        kept.append(tensor.untyped_storage().nbytes())
        return tensor

    with plain_autograd(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        backbone(x.requires_grad_())
    return sum(kept)


def test_pool_keeps_indices_not_its_input(monkeypatch):
    backbone = learner_for("maml", {}).backbone
    x = torch.rand(15, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    fast = saved_bytes(backbone, x)
    stock(monkeypatch, backbone)
    reference = saved_bytes(backbone, x)
    # The first block's BatchNorm output (15 x 16 x 28 x 28 floats) is no longer kept.
    assert reference - fast >= 15 * 16 * 28 * 28 * 4
