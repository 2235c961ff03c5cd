"""Siamese Networks: verification on all pairs of an episode, one-shot by the most similar image."""

from __future__ import annotations

import itertools

import torch

from learners.backbones import build_backbone
from learners.base import Objective
from learners.siamese import Siamese
from pipelines.base import Task


def make() -> Siamese:
    return Siamese(build_backbone("mlp", (16,), None, hidden=(12,)),
                   Objective.for_task_kind("classification"), Siamese.Hyperparameters())


def test_predict_takes_the_most_similar_support_image_of_each_class():
    learner = make()
    params = learner.init_params(0)
    support_x, query_x = torch.randn(6, 16), torch.randn(4, 16)
    support_y = torch.tensor([2, 0, 1, 0, 2, 1])
    outputs = learner.predict(params, learner.adapt(params, support_x, support_y), query_x)
    support, queries = learner.embed(params, support_x), learner.embed(params, query_x)
    weight, bias = params["verify.weight"][0], params["verify.bias"][0]
    for q, label in itertools.product(range(4), range(3)):
        same = [((queries[q] - support[s]).abs() * weight).sum() + bias
                for s in range(6) if support_y[s] == label]
        torch.testing.assert_close(outputs[q, label], max(same), rtol=1e-4, atol=1e-5)


def test_training_loss_is_balanced_verification_over_all_pairs():
    learner = make()
    params = learner.init_params(0)
    task = Task(torch.randn(3, 16), torch.tensor([0, 1, 2]), torch.randn(6, 16),
                torch.tensor([0, 0, 1, 1, 2, 2]))
    _, loss, outputs = learner.task_gradient(params, task)
    encodings = torch.cat([learner.embed(params, task.support_x), learner.embed(params, task.query_x)])
    labels = torch.cat([task.support_y, task.query_y])
    same, different = [], []
    for i, j in itertools.combinations(range(9), 2):
        logit = learner.same_logits(params, encodings[i:i + 1], encodings[j:j + 1])[0, 0]
        target = float(labels[i] == labels[j])
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logit, torch.tensor(target))
        (same if target else different).append(bce)
    assert len(same) == 9 and len(different) == 27
    expected = 0.5 * torch.stack(same).mean() + 0.5 * torch.stack(different).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    adapted = learner.adapt(params, task.support_x, task.support_y)
    torch.testing.assert_close(outputs, learner.predict(params, adapted, task.query_x))
