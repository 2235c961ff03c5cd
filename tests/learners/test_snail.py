"""SNAIL: causality of the sequence model, queries that never see each other, task shapes it
refuses (at sweep load and when serving), and learning Omniglot characters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from learners.backbones import build_backbone
from learners.base import Objective
from learners.nets_snail import SequenceModel
from learners.snail import SNAIL
from orchestrator.config import ConfigError, sweep_from_dict
from pipelines.episodes import EpisodeFamily


def make(input_shape=(16,), *, backbone: str = "mlp", filters: int = 8, **knobs) -> SNAIL:
    net = build_backbone(backbone, input_shape, None, hidden=(16,), filters=filters)
    hparams = SNAIL.Hyperparameters(**{"filters": 8, "key_size": 8, "value_size": 8, **knobs})
    return SNAIL(net, Objective.for_task_kind("classification"), hparams)


def test_a_later_element_never_changes_an_earlier_output():
    torch.manual_seed(0)
    model = SequenceModel(6, 3, length=9, filters=4, key_size=4, value_size=4)
    sequence, queries = torch.randn(9, 6), torch.randn(4, 6)
    outputs, query_outputs = model(sequence, queries)
    for t in range(9):
        changed = sequence.clone()
        changed[t] += torch.randn(6)
        after, after_queries = model(changed, queries)
        torch.testing.assert_close(after[:t], outputs[:t], rtol=0, atol=0)
        assert not torch.allclose(after[t:], outputs[t:])
        assert not torch.allclose(after_queries, query_outputs)  # queries see every element
    # A query never sees another query: changing one changes only its own output.
    changed = queries.clone()
    changed[2] += 1.0
    _, after_queries = model(sequence, changed)
    torch.testing.assert_close(after_queries[[0, 1, 3]], query_outputs[[0, 1, 3]], rtol=0, atol=0)
    # Reading queries after the sequence equals running each query as the sequence's next element.
    for j in range(4):
        alone, _ = model(torch.cat([sequence, queries[j:j + 1]]), queries[:0])
        torch.testing.assert_close(query_outputs[j], alone[-1], rtol=1e-5, atol=1e-6)


def test_logits_cover_the_task_classes_and_labels_are_read():
    learner = make(max_ways=6, max_support=12)
    params = learner.init_params(0)
    support_x, query_x = torch.randn(6, 16), torch.randn(5, 16)
    support_y = torch.tensor([0, 1, 2, 0, 1, 2])
    logits = learner.predict(params, learner.adapt(params, support_x, support_y), query_x)
    assert logits.shape == (5, 3)
    swapped = learner.adapt(params, support_x, torch.tensor([1, 0, 2, 1, 0, 2]))
    assert not torch.allclose(learner.predict(params, swapped, query_x), logits)
    assert learner.servable_ways(params) == 6


def test_refuses_tasks_beyond_its_knobs():
    learner = make(max_ways=5, max_support=10)
    params = learner.init_params(0)
    with pytest.raises(ValueError, match="max_ways 5 cannot serve 6-way"):
        learner.adapted_outputs(params, torch.randn(6, 16), torch.arange(6), torch.randn(2, 16))
    with pytest.raises(ValueError, match="max_support 10 cannot serve a support set of 15"):
        learner.adapt(params, torch.randn(15, 16), torch.arange(5).repeat(3))
    data = {"path": "unread", "ways": 5, "shots": 3}
    with pytest.raises(ConfigError, match="algorithms.snail: .*max_support 10 cannot serve a "
                                          "support set of 15 examples.*set max_support"):
        sweep_from_dict({"name": "s", "data": data, "algorithms": {"snail": {"max_support": 10}}})
    with pytest.raises(ConfigError, match="max_ways 5 cannot serve 20-way"):
        sweep_from_dict({"name": "s", "data": {**data, "ways": 20, "shots": 1},
                         "algorithms": {"snail": {"max_support": 20}}})
    with pytest.raises(ConfigError, match="max_ways 4 cannot serve 5-way"):  # a searched knob
        sweep_from_dict({"name": "s", "data": data,
                         "algorithms": {"snail": {"max_ways": {"choices": [4, 8]}}}})
    sweep_from_dict({"name": "s", "data": data, "algorithms": {"snail": {"max_support": 15}}})


def test_learns_held_out_omniglot_alphabets(omniglot_dir: Path):
    """5-way 1-shot on the small Omniglot set (Conv-4 with 8 filters), scored on the test split's
    held-out alphabet (chance 0.2)."""
    family = EpisodeFamily(omniglot_dir, ways=5, shots=1, queries=2)
    learner = make(family.input_shape(), backbone="conv4", max_support=5)
    params = {k: v.requires_grad_(True) for k, v in learner.init_params(0).items()}
    optimizer = torch.optim.Adam(params.values(), lr=0.003)
    meta_batch = 4
    for iteration in range(100):
        batch = family.batch("train", 0, range(iteration * meta_batch, (iteration + 1) * meta_batch))
        gradient, _ = learner.batch_gradient(params, batch)
        for name, p in params.items():
            p.grad = gradient[name] / meta_batch
        optimizer.step()
    tests = 100
    accuracy = learner.batch_evaluate(params, family.batch("test", 1, range(tests)))["accuracy"]
    print(f"snail 5-way 1-shot on held-out alphabets after 100 iterations: {accuracy / tests:.3f}")
    assert accuracy / tests > 0.4
