"""SNAIL: causality of the sequence model, queries that never see each other, task shapes it
refuses (at sweep load and when serving), and learning to read labels by matching."""

from __future__ import annotations

import pytest
import torch

from learners.backbones import build_backbone
from learners.base import Objective
from learners.nets.snail import SequenceModel
from learners.snail import SNAIL
from orchestrator.config import ConfigError, sweep_from_dict
from pipelines.base import Task, TaskBatch


def make(input_shape=(16,), *, hidden=(16,), **knobs) -> SNAIL:
    net = build_backbone("mlp", input_shape, None, hidden=hidden)
    hparams = SNAIL.Hyperparameters(**{"filters": 8, "key_size": 8, "value_size": 8, **knobs})
    return SNAIL(net, Objective.for_task_kind("classification"), hparams)


@pytest.mark.parametrize("query_sees_itself", [True, False])
def test_a_later_element_never_changes_an_earlier_output(query_sees_itself):
    torch.manual_seed(0)
    model = SequenceModel(6, 3, length=9, filters=4, key_size=4, value_size=4,
                          query_sees_itself=query_sees_itself)
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
    if not query_sees_itself:
        return
    # Reading queries after the sequence equals running each query as the sequence's next element.
    for j in range(4):
        alone, _ = model(torch.cat([sequence, queries[j:j + 1]]), queries[:0])
        torch.testing.assert_close(query_outputs[j], alone[-1], rtol=1e-5, atol=1e-6)


def test_attention_starts_as_a_similarity_when_tied():
    tied, untied = make(), make(tied_init=False)
    params, other = tied.init_params(0), untied.init_params(0)
    for block in range(0, 5, 2):  # attention, TC, attention, TC, attention
        for kind in ("weight", "bias"):
            key, query = f"snail.blocks.{block}.key.{kind}", f"snail.blocks.{block}.query.{kind}"
            torch.testing.assert_close(params[key], params[query], rtol=0, atol=0)
            assert not torch.allclose(other[key], other[query])
    assert params["snail.blocks.0.key.weight"] is not params["snail.blocks.0.query.weight"]


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


def copies(generator: torch.Generator, *, ways: int = 5, shots: int = 2, queries: int = 5) -> Task:
    """A task whose queries are noisy copies of its support examples: read by matching."""
    centres = torch.randn(ways, 16, generator=generator)
    support_y = torch.arange(ways).repeat_interleave(shots)
    query_y = torch.arange(ways).repeat_interleave(queries)
    return Task(centres[support_y] + 0.1 * torch.randn(len(support_y), 16, generator=generator),
                support_y,
                centres[query_y] + 0.1 * torch.randn(len(query_y), 16, generator=generator),
                query_y)


def test_learns_to_read_labels_by_matching():
    """200 meta-iterations on tasks whose queries are noisy copies of support examples: the
    sequence model must learn to find the matching support element and read its label.
    (The contract's tiny-task test skips SNAIL: its default sequence model is too large for that
    test's rate and time; this one uses a small model.)"""
    learner = make(hidden=(40, 40), max_support=10, filters=32, key_size=32, value_size=32)
    params = {k: v.requires_grad_(True) for k, v in learner.init_params(0).items()}
    optimizer = torch.optim.Adam(params.values(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    held_out = TaskBatch.stack([copies(generator) for _ in range(40)])
    before = learner.batch_evaluate(params, held_out)
    for _ in range(200):
        gradient, _ = learner.batch_gradient(params, TaskBatch.stack(
            [copies(generator) for _ in range(4)]), vectorize=True)
        for name, p in params.items():
            p.grad = gradient[name] / 4
        optimizer.step()
    after = learner.batch_evaluate(params, held_out)
    print(f"snail on noisy copies: accuracy {before['accuracy'] / 40:.3f} -> "
          f"{after['accuracy'] / 40:.3f}")
    assert after["loss"] < 0.7 * before["loss"]
    assert after["accuracy"] / 40 > 0.5
