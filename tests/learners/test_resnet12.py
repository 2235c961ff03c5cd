"""The ResNet-12 backbone: shapes, widths, and a gradient learner and metric learners running on it."""

from __future__ import annotations

import pytest
import torch

from learners.backbones import build_backbone
from learners.base import Objective
from learners.registry import learner_class
from pipelines.base import Task, TaskBatch

FILTERS = 2  # tiny widths: 2-5-10-20


def test_shapes_widths_and_functional_call():
    omniglot = build_backbone("resnet12", (1, 28, 28), 5, filters=FILTERS)
    # 28 -> 14 -> 7 -> 3 -> 1 after four 2x2 poolings; the last block is 10x as wide.
    assert omniglot.feature_size == 10 * FILTERS
    assert omniglot(torch.randn(3, 1, 28, 28)).shape == (3, 5)
    widths = [block.body[0].out_channels for block in omniglot.body[:4]]
    assert widths == [2, 5, 10, 20]
    assert [block.body[0].out_channels for block in
            build_backbone("resnet12", (3, 84, 84), None, filters=64).body[:4]] == [64, 160, 320, 640]
    images = build_backbone("resnet12", (3, 84, 84), None, filters=FILTERS)
    assert images.feature_size == 10 * FILTERS * 5 * 5  # 84 -> 42 -> 21 -> 10 -> 5, no avg pool
    assert images(torch.randn(2, 3, 84, 84)).shape == (2, images.feature_size)
    # Batch statistics only: nothing is tracked, so a forward pass never changes the module.
    assert not any(name.endswith("running_mean") for name, _ in omniglot.named_buffers())
    with pytest.raises(ValueError, match="too small"):
        build_backbone("resnet12", (1, 8, 8), None, filters=FILTERS)


def tasks(ways: int = 3, count: int = 2) -> TaskBatch:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(ways)
    return TaskBatch.stack([Task(torch.randn(ways, 1, 28, 28, generator=generator,
                                             dtype=torch.float64), labels,
                                 torch.randn(ways, 1, 28, 28, generator=generator,
                                             dtype=torch.float64), labels)
                            for _ in range(count)])


@pytest.mark.parametrize("algorithm", ["maml", "protonet", "metaoptnet"])
def test_learners_run_on_resnet12(algorithm):
    """Every parameter gets a finite, non-zero meta-gradient (MAML's through functional_call and
    torch.func.grad), and the vmapped batch equals the loop."""
    cls = learner_class(algorithm)
    batch = tasks()
    head = 3 if cls.needs_head else None
    # float64, so that the vmapped and looped sums agree to rounding through twelve BN layers.
    backbone = build_backbone("resnet12", (1, 28, 28), head, filters=FILTERS).double()
    knobs = {"inner_lr": 0.1} if "inner_lr" in cls.Hyperparameters.model_fields else {}
    learner = cls(backbone, Objective.for_task_kind("classification"), cls.Hyperparameters(**knobs))
    params = {k: v.double() for k, v in learner.init_params(0).items()}
    looped, stats = learner.batch_gradient(params, batch)
    for name, g in looped.items():
        assert g.shape == params[name].shape
        assert torch.isfinite(g).all() and g.abs().sum() > 0, f"zero meta-gradient for {name}"
    mapped, _ = learner.batch_gradient(params, batch, vectorize=True)
    for name in params:
        torch.testing.assert_close(mapped[name], looped[name], rtol=1e-7, atol=1e-10)
    assert 0 <= stats["accuracy"] <= len(batch)
