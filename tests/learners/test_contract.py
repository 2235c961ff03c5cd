"""The contract every learner in ``learners.registry.LEARNERS`` keeps, checked on each of them.

Learners with an output head are checked on sinusoid regression with the paper's MLP; metric
learners (``needs_head = False``) on a small synthetic classification family whose classes differ
in four of sixteen input dimensions, so an embedding has something to learn (ignore the rest).
Regression-only learners without a head (ALPaCA's feature map) are checked on sinusoids.
Pretraining learners (Baseline, Baseline++, SimpleShot) train on labelled minibatches of the
same family's fixed training classes (``Clusters.minibatches``) and adapt on its episodes.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from learners.backbones import build_backbone
from learners.base import Learner, Objective
from learners.registry import LEARNERS
from pipelines.base import Minibatches, Task, TaskBatch, TaskFamily, task_seed
from pipelines.sinusoid import Sinusoid

from meta_training import meta_train, trainable

DIMENSIONS, SIGNAL = 16, 4
# The classes pretraining learners are trained to tell apart (fixed centres per split).
TRAINING_CLASSES = 12


class Clusters(TaskFamily):
    """N-way tasks of Gaussian classes: centres differ in the first 4 dims, the rest is noise."""

    kind = "classification"

    def __init__(self, *, ways: int = 5, shots: int = 2, queries: int = 5):
        self._ways, self.shots, self.queries = ways, shots, queries

    def task(self, split: str, seed: int, index: int, *, shots: int | None = None) -> Task:
        generator = torch.Generator().manual_seed(task_seed(seed, split, index))
        k = self.shots if shots is None else shots
        centres = self.centres(self._ways, generator)

        def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            labels = torch.arange(self._ways).repeat_interleave(n)
            return self.examples(centres, labels, generator), labels

        return Task(*draw(k), *draw(self.queries))

    @staticmethod
    def centres(classes: int, generator: torch.Generator) -> torch.Tensor:
        centres = torch.zeros(classes, DIMENSIONS)
        centres[:, :SIGNAL] = torch.randn(classes, SIGNAL, generator=generator)
        return centres

    @staticmethod
    def examples(centres: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(len(labels), DIMENSIONS, generator=generator)
        noise[:, :SIGNAL] *= 0.2
        noise[:, SIGNAL:] *= 1.5
        return centres[labels] + noise

    def class_count(self, split: str) -> int:
        return TRAINING_CLASSES

    def minibatches(self, split: str, seed: int, indices, *, size: int) -> Minibatches:
        """Shards of examples of the split's ``TRAINING_CLASSES`` fixed classes."""
        centres = self.centres(TRAINING_CLASSES,
                               torch.Generator().manual_seed(task_seed(0, split, -1)))
        xs, ys = [], []
        for index in indices:
            generator = torch.Generator().manual_seed(task_seed(seed, f"{split}/shard", index))
            labels = torch.randint(TRAINING_CLASSES, (size,), generator=generator)
            xs.append(self.examples(centres, labels, generator))
            ys.append(labels)
        return Minibatches(torch.stack(xs), torch.stack(ys))

    @property
    def ways(self) -> int:
        return self._ways

    def input_shape(self) -> tuple[int, ...]:
        return (DIMENSIONS,)

    def output_size(self) -> int:
        return self._ways

    def fingerprint_spec(self) -> dict[str, Any]:
        return {"family": "clusters", "ways": self._ways}


def make(name: str) -> tuple[Learner, TaskFamily]:
    cls = LEARNERS[name]
    # Learners that do regression are checked on sinusoids; classification-only ones (with or
    # without an output head) on the synthetic classes.
    if "regression" in cls.task_kinds:
        family: TaskFamily = Sinusoid(shots=10, queries=10)
        objective = Objective.for_task_kind("regression")
    else:
        family = Clusters()
        objective = Objective.for_task_kind("classification")
    head = family.output_size() if cls.needs_head else None
    backbone = build_backbone("mlp", family.input_shape(), head, hidden=(40, 40))
    # A larger inner step than the paper's 0.01, so one step adapts visibly within a short test.
    hparams = {k: v for k, v in {"inner_lr": 0.05}.items() if k in cls.Hyperparameters.model_fields}
    learner = cls(backbone, objective, cls.Hyperparameters(**hparams))
    learner.output_size = family.output_size()  # as build_learner does
    learner.classes = family.class_count("train")
    return learner, family


# Ids name the family first (``gradient-maml``), so ``-k metric`` runs one family.
@pytest.fixture(params=list(LEARNERS),
                ids=[f"{cls.family}-{name}" for name, cls in LEARNERS.items()])
def learner_and_family(request) -> tuple[Learner, TaskFamily]:
    return make(request.param)


def test_predict_shapes(learner_and_family):
    learner, family = learner_and_family
    params = learner.init_params(0)
    task = family.task("train", 0, 0)
    outputs = learner.predict(params, learner.adapt(params, task.support_x, task.support_y),
                              task.query_x)
    if learner.objective.classification:
        assert outputs.shape == (len(task.query_x), family.ways)
    else:
        assert outputs.shape == task.query_y.shape
    assert torch.isfinite(outputs).all()


def test_init_params_is_seeded_and_leaves_the_global_generator_alone(learner_and_family):
    learner, _ = learner_and_family
    torch.manual_seed(123)
    caller = torch.get_rng_state()
    a, b, c = learner.init_params(7), learner.init_params(7), learner.init_params(8)
    assert torch.equal(torch.get_rng_state(), caller)  # library code draws from its own
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_every_parameter_gets_a_meta_gradient(learner_and_family):
    learner, family = learner_and_family
    params = learner.init_params(0)
    if learner.family == "pretrained":  # trained on labelled minibatches, not on tasks
        gradient, stats = learner.batch_gradient(
            params, learner.training_batch(family, "train", 0, [0]))
        assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    else:
        task = family.task("train", 0, 0)
        gradient, loss, outputs = learner.task_gradient(params, task)
        assert loss.shape == () and torch.isfinite(loss)
        assert outputs.shape[0] == len(task.query_x)
    assert gradient.keys() == params.keys()
    for name, g in gradient.items():
        assert g.shape == params[name].shape
        assert torch.isfinite(g).all() and g.abs().sum() > 0, f"zero meta-gradient for {name}"


def test_batched_equals_looped(learner_and_family):
    learner, family = learner_and_family
    params = learner.init_params(0)
    training = learner.training_batch(family, "train", 0, range(3))
    looped, looped_stats = learner.batch_gradient(params, training, vectorize=False)
    mapped, mapped_stats = learner.batch_gradient(params, training, vectorize=True)
    for name in params:
        torch.testing.assert_close(mapped[name], looped[name], rtol=1e-4, atol=1e-6)
    assert mapped_stats == pytest.approx(looped_stats, rel=1e-4)
    batch = family.batch("train", 0, range(3))
    evaluated = learner.batch_evaluate(params, batch, vectorize=True)
    assert evaluated == pytest.approx(learner.batch_evaluate(params, batch), rel=1e-4)
    # A batch's statistics are the sums of its tasks' own, each evaluated as a batch of one.
    single = [learner.batch_evaluate(params, TaskBatch.stack([batch[i]]))
              for i in range(len(batch))]
    assert evaluated == pytest.approx({key: sum(s[key] for s in single) for key in evaluated},
                                      rel=1e-4)


def mean_stats(learner: Learner, params, family: TaskFamily, tasks: int = 40) -> dict[str, float]:
    stats = learner.batch_evaluate(params, family.batch("val", 1, range(tasks)), vectorize=True)
    return {key: value / tasks for key, value in stats.items()}


def test_learns_on_a_tiny_task(learner_and_family):
    learner, family = learner_and_family
    if learner.name == "snail":
        pytest.skip("SNAIL's default sequence model (128-filter TC blocks over 25 support "
                    "positions, 3.8M weights) does not learn at this test's rate 0.01 and takes "
                    "20 s here; at 0.001 it moves (loss 1.61 -> 1.30) but not below 0.7x in 200 "
                    "iterations; tests/learners/test_snail.py checks learning on a small model")
    params = trainable(learner)
    before = mean_stats(learner, params, family)
    meta_train(learner, family, params, iterations=200, meta_batch=4, lr=0.01, vectorize=True)
    after = mean_stats(learner, params, family)
    assert after["loss"] < 0.7 * before["loss"]
    if learner.objective.classification:
        assert after["accuracy"] > before["accuracy"] + 0.1


def test_default_search_space_is_valid(learner_and_family):
    """Every knob of a learner's default search space is one the sweep file accepts."""
    from orchestrator.config import sweep_from_dict

    learner, _ = learner_and_family
    data = {"family": "sinusoid"} if "regression" in learner.task_kinds else {"path": "unread"}
    sweep = sweep_from_dict({"name": "space", "data": data,
                             "algorithms": {learner.name: dict(learner.search_space)}})
    assert sweep.space(learner.name).keys() == learner.search_space.keys()
