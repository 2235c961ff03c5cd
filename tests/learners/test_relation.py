"""Relation Networks: summed class features, relation scores in [0, 1], MSE on one-hot targets."""

from __future__ import annotations

import pytest
import torch

from learners.backbones import build_backbone
from learners.base import Objective
from learners.relation import Relation
from pipelines.base import Task, TaskBatch


def make(backbone: str, input_shape, **model) -> Relation:
    return Relation(build_backbone(backbone, input_shape, None, **model),
                    Objective.for_task_kind("classification"), Relation.Hyperparameters())


def test_class_features_are_summed_and_scores_regress_one_hot_targets():
    learner = make("mlp", (16,), hidden=(12,))
    params = learner.init_params(0)
    support_x, query_x = torch.randn(6, 16), torch.randn(4, 16)
    support_y = torch.tensor([2, 0, 1, 0, 2, 1])
    classes = learner.adapt(params, support_x, support_y)["classes"]
    features = learner.embed(params, support_x)
    for label in range(3):
        torch.testing.assert_close(classes[label], features[support_y == label].sum(0))
    scores = learner.predict(params, {"classes": classes}, query_x)
    assert scores.shape == (4, 3) and ((scores >= 0) & (scores <= 1)).all()
    query_y = torch.tensor([0, 2, 2, 1])
    expected = ((scores - torch.nn.functional.one_hot(query_y, 3)) ** 2).mean()
    torch.testing.assert_close(learner.objective.loss(scores, query_y), expected)
    assert any(k.startswith("relation.") for k in params)


def test_conv4_relation_module_compares_feature_maps():
    """On 84x84 images Conv-4 ends in 5x5 maps, the paper's size: the relation module's two conv
    blocks pool them to 2x2 and 1x1, as in Sung et al.; 28x28 images give 1x1 maps, not pooled."""
    learner = make("conv4", (3, 84, 84), filters=4)
    assert learner.feature_shape == (4, 5, 5)
    convs = [m for m in learner.relation.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.in_channels for c in convs] == [8, 4]
    assert learner.relation[-3].in_features == 4
    params = learner.init_params(0)
    support_y = torch.tensor([0, 1, 2])
    adapted = learner.adapt(params, torch.randn(3, 3, 84, 84), support_y)
    assert adapted["classes"].shape == (3, 4, 5, 5)
    assert learner.predict(params, adapted, torch.randn(2, 3, 84, 84)).shape == (2, 3)
    small = make("conv4", (1, 28, 28), filters=4)
    assert small.feature_shape == (4, 1, 1) and small.relation[-3].in_features == 4


def test_relation_on_feature_maps_runs_under_vmap():
    """The contract tests vmap the vector path (mlp); this checks the conv relation module."""
    learner = make("conv4", (1, 40, 40), filters=4)
    assert learner.feature_shape == (4, 2, 2)  # the first relation block pools, the second not
    params = learner.init_params(0)
    generator = torch.Generator().manual_seed(0)
    batch = TaskBatch.stack([Task(torch.rand(3, 1, 40, 40, generator=generator), torch.arange(3),
                                  torch.rand(6, 1, 40, 40, generator=generator),
                                  torch.arange(3).repeat(2)) for _ in range(2)])
    looped, looped_stats = learner.batch_gradient(params, batch, vectorize=False)
    mapped, mapped_stats = learner.batch_gradient(params, batch, vectorize=True)
    for name in params:
        torch.testing.assert_close(mapped[name], looped[name], rtol=1e-4, atol=1e-6)
    assert mapped_stats["loss"] == pytest.approx(looped_stats["loss"], rel=1e-4)
