"""Prototypical Networks: prototypes, distances, and learning Omniglot characters."""

from __future__ import annotations

from pathlib import Path

import torch

from learners.backbones import build_backbone, call
from learners.base import Objective
from learners.protonet import ProtoNet
from pipelines.episodes import EpisodeFamily

from meta_training import meta_train, trainable


def make(input_shape, *, filters: int = 32) -> ProtoNet:
    backbone = build_backbone("conv4", input_shape, None, filters=filters)
    return ProtoNet(backbone, Objective.for_task_kind("classification"),
                    ProtoNet.Hyperparameters())


def test_prototypes_are_class_means_and_logits_negative_squared_distances():
    learner = make((1, 28, 28), filters=8)
    params = learner.init_params(0)
    support_x, query_x = torch.randn(6, 1, 28, 28), torch.randn(4, 1, 28, 28)
    support_y = torch.tensor([2, 0, 1, 0, 2, 1])
    prototypes = learner.adapt(params, support_x, support_y)["prototypes"]
    embeddings = call(learner.backbone, params, support_x).flatten(1)
    assert prototypes.shape == (3, learner.backbone.feature_size)
    for label in range(3):
        torch.testing.assert_close(prototypes[label], embeddings[support_y == label].mean(0))
    logits = learner.predict(params, {"prototypes": prototypes}, query_x)
    queries = call(learner.backbone, params, query_x).flatten(1)
    torch.testing.assert_close(logits, -torch.cdist(queries, prototypes) ** 2, rtol=1e-4, atol=1e-4)
    assert learner.needs_head is False and learner.uses_inner_steps is False


def test_learns_held_out_omniglot_alphabets(omniglot_dir: Path):
    """150 meta-iterations of 5-way 1-shot (Conv-4, 32 filters, 28x28) on the small Omniglot set,
    scored on the test split's alphabet, never seen in training. Measured: 0.86 (chance 0.2)."""
    family = EpisodeFamily(omniglot_dir, ways=5, shots=1, queries=5)
    learner = make(family.input_shape())
    params = meta_train(learner, family, trainable(learner), iterations=150, meta_batch=2,
                        lr=0.003)
    tests = 100
    stats = learner.batch_evaluate(params, family.batch("test", 1, range(tests)))
    accuracy = stats["accuracy"] / tests
    print(f"protonet 5-way 1-shot on held-out alphabets after 150 iterations: {accuracy:.3f}")
    assert accuracy > 0.55
