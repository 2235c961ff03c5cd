"""Self-Critique and Adapt: the critic's steps change the model and learn; SCA learns Omniglot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from learners.backbones import build_backbone
from learners.base import Objective
from learners.maml import MAML
from learners.sca import SCA
from pipelines.episodes import EpisodeFamily
from pipelines.base import Task, TaskBatch

from meta_training import meta_train, trainable


def make(**knobs) -> SCA:
    torch.manual_seed(0)
    backbone = build_backbone("mlp", (8,), 5, hidden=(16, 16))
    return SCA(backbone, Objective.for_task_kind("classification"), SCA.Hyperparameters(**knobs))


def a_task() -> Task:
    """5-way 2-shot, 3 queries per class, of Gaussian classes in 8 dimensions."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 8, generator=generator)
    support_y, query_y = torch.arange(5).repeat(2), torch.arange(5).repeat(3)
    return Task(centres[support_y] + 0.3 * torch.randn(10, 8, generator=generator), support_y,
                centres[query_y] + 0.3 * torch.randn(15, 8, generator=generator), query_y)


@pytest.mark.parametrize("adapts", ["all", "head"])
def test_critic_steps_change_the_adapted_model(adapts):
    task = a_task()
    outputs = {}
    for steps in (0, 2):
        learner = make(critic_steps=steps, critic_adapts=adapts)
        params = learner.init_params(0)
        adapted = learner.adapt(params, task.support_x, task.support_y)
        outputs[steps] = learner.predict(params, adapted, task.query_x)
    assert (outputs[0] - outputs[2]).abs().max() > 1e-4


@pytest.mark.parametrize("adapts", ["all", "head"])
def test_critic_gets_a_meta_gradient_and_without_critic_steps_sca_is_maml(adapts):
    task = a_task()
    learner = make(critic_steps=2, critic_adapts=adapts)
    params = learner.init_params(0)
    gradient, _, _ = learner.task_gradient(params, task)
    critic = [k for k in params if k.startswith("critic.")]
    assert critic and all(gradient[k].abs().sum() > 0 for k in critic)

    without = make(critic_steps=0, critic_adapts=adapts)
    gradient, _, _ = without.task_gradient(params, task)
    maml = MAML(without.backbone, without.objective,
                MAML.Hyperparameters(inner_lr=without.hparams.inner_lr,
                                     inner_steps=without.hparams.inner_steps))
    expected, _, _ = maml.task_gradient({k: v for k, v in params.items() if k not in critic}, task)
    for k, g in expected.items():
        torch.testing.assert_close(gradient[k], g)
    assert all(gradient[k].abs().sum() == 0 for k in critic)


def finite_difference(learner: SCA, params: dict, task: Task, name: str, index: tuple[int, ...],
                      eps: float = 1e-6) -> float:
    def loss(p: dict) -> float:
        return float(learner.query_loss(p, task)[0])

    plus = {k: v.clone() for k, v in params.items()}
    minus = {k: v.clone() for k, v in params.items()}
    plus[name][index] += eps
    minus[name][index] -= eps
    return (loss(plus) - loss(minus)) / (2 * eps)


@pytest.mark.parametrize("adapts", ["all", "head"])
@pytest.mark.parametrize("path", ["torch.func", "autograd"])
def test_meta_gradient_matches_finite_differences(path, adapts):
    """In float64, both of ``batch_gradient``'s per-task paths. The critic steps read the
    support summary, made from the same fast weights they step: a constant of the critic's
    gradient. Plain autograd once followed it into that gradient (10-200% off, 'all' only)."""
    learner = make(critic_steps=2, inner_steps=2, critic_adapts=adapts)
    learner.backbone.double()
    learner.critic.double()
    plain = a_task()
    task = Task(plain.support_x.double(), plain.support_y, plain.query_x.double(), plain.query_y)
    params = {k: v.double() for k, v in learner.init_params(0).items()}
    if path == "torch.func":
        gradient, _, _ = learner.task_gradient(params, task)
    else:
        batch = TaskBatch(task.support_x[None], task.support_y[None], task.query_x[None],
                          task.query_y[None])
        gradient, _ = learner.autograd_batch_gradient(params, batch, ways=5)
    for name, index in [("body.0.weight", (3, 1)), ("body.2.bias", (5,)), ("head.weight", (2, 7)),
                        ("critic.layers.0.weight", (4, 2)), ("critic.layers.4.weight", (0, 9))]:
        numeric = finite_difference(learner, params, task, name, index)
        assert gradient[name][index].item() == pytest.approx(numeric, rel=1e-6, abs=1e-9), name


def test_critic_sees_no_query_labels():
    """The query labels enter only the outer loss: adapting and predicting never read them."""
    task = a_task()
    learner = make(critic_steps=2)
    params = learner.init_params(0)
    outputs = learner.adapted_outputs(params, task.support_x, task.support_y, task.query_x)
    _, _, trained = learner.task_gradient(params, task)
    torch.testing.assert_close(trained, outputs)


def test_learns_held_out_omniglot_alphabets(omniglot_dir: Path):
    """30 meta-iterations of 5-way 1-shot on the small Omniglot set (Conv-4 with 8 filters),
    scored on the held-out test alphabet (chance 0.2). Measured over seeds 0-11 (initial weights
    and training episodes): gains of 0.11-0.19 (seed 0: 0.25 before, 0.43 after)."""
    family = EpisodeFamily(omniglot_dir, ways=5, shots=1, queries=5)
    learner = SCA(build_backbone("conv4", family.input_shape(), 5, filters=8),
                  Objective.for_task_kind("classification"), SCA.Hyperparameters())
    params = trainable(learner)
    tests = 50

    def accuracy() -> float:
        return learner.batch_evaluate(params, family.batch("test", 1, range(tests)))["accuracy"] / tests

    before = accuracy()
    meta_train(learner, family, params, iterations=30, meta_batch=2, lr=0.01)
    after = accuracy()
    print(f"sca 5-way 1-shot on held-out alphabets: {before:.3f} before, {after:.3f} after")
    assert after > before + 0.06
