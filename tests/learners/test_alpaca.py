"""ALPaCA: the closed-form posterior and predictive against the textbook formulas, the training
loss against per-prefix likelihoods, and learning sinusoids with intervals that cover."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from learners.alpaca import ALPaCA, JITTER, LOG_NOISE, PRIOR_FACTOR, PRIOR_MEAN
from learners.backbones import build_backbone
from learners.base import Objective
from pipelines.base import Task
from pipelines.sinusoid import Sinusoid

from meta_training import meta_train, trainable


def make(*, hidden=(8, 8), outputs: int = 1, double: bool = False, **knobs) -> ALPaCA:
    torch.manual_seed(0)
    backbone = build_backbone("mlp", (1,), None, hidden=hidden)
    learner = ALPaCA(backbone.double() if double else backbone,
                     Objective.for_task_kind("regression"), ALPaCA.Hyperparameters(**knobs))
    learner.output_size = outputs
    return learner


def random_params(learner: ALPaCA) -> dict[str, torch.Tensor]:
    """Seeded parameters away from the initial prior, in double precision."""
    params = {k: v.double() for k, v in learner.init_params(0).items()}
    generator = torch.Generator().manual_seed(1)
    params[PRIOR_FACTOR] = torch.randn(params[PRIOR_FACTOR].shape, generator=generator,
                                       dtype=torch.double)
    params[LOG_NOISE] = torch.randn(params[LOG_NOISE].shape, generator=generator,
                                    dtype=torch.double)
    return params


def test_posterior_and_predictive_are_bayesian_linear_regression():
    learner = make(outputs=2, double=True)
    params = random_params(learner)
    support_x, query_x = torch.randn(6, 1).double(), torch.randn(4, 1).double()
    support_y, query_y = torch.randn(6, 2).double(), torch.randn(4, 2).double()
    phi, phi_q = learner.features(params, support_x), learner.features(params, query_x)
    factor = params[PRIOR_FACTOR]
    prior = factor @ factor.T + JITTER * torch.eye(len(factor), dtype=torch.double)
    precision = phi.T @ phi + prior
    mean_weights = torch.linalg.inv(precision) @ (phi.T @ support_y + prior @ params[PRIOR_MEAN])
    spread = 1 + torch.einsum("qf,fg,qg->q", phi_q, torch.linalg.inv(precision), phi_q)
    variance = spread[:, None] * params[LOG_NOISE].exp()

    adapted = learner.adapt(params, support_x, support_y)
    torch.testing.assert_close(adapted["mean"], mean_weights)
    mean, std = learner.predict_distribution(params, adapted, query_x)
    torch.testing.assert_close(mean, phi_q @ mean_weights)
    torch.testing.assert_close(learner.predict(params, adapted, query_x), mean)
    torch.testing.assert_close(std, variance.sqrt())
    # The whole support set, no prefixes: the loss is the exact Gaussian NLL of the queries.
    whole = make(outputs=2, double=True, variable_context=False)
    _, loss, outputs = whole.task_gradient(params, Task(support_x, support_y, query_x, query_y))
    expected = -Normal(mean, std).log_prob(query_y).sum(dim=-1).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(outputs, mean)


def test_variable_context_loss_averages_every_support_prefix():
    learner = make(double=True)
    params = random_params(learner)
    task = Task(torch.randn(5, 1).double(), torch.randn(5, 1).double(),
                torch.randn(7, 1).double(), torch.randn(7, 1).double())
    losses = []
    for n in range(6):  # 0..K support points; 0 is the prior's own prediction
        adapted = learner.adapt(params, task.support_x[:n], task.support_y[:n])
        mean, std = learner.predict_distribution(params, adapted, task.query_x)
        losses.append(-Normal(mean, std).log_prob(task.query_y).sum(dim=-1).mean())
    _, loss, _ = learner.task_gradient(params, task)
    torch.testing.assert_close(loss, torch.stack(losses).mean())


def test_meta_gradient_matches_finite_differences():
    learner = make(double=True)
    params = random_params(learner)
    task = Task(torch.randn(4, 1).double(), torch.randn(4, 1).double(),
                torch.randn(5, 1).double(), torch.randn(5, 1).double())
    gradient, _, _ = learner.task_gradient(params, task)
    eps = 1e-6
    for name, index in [(PRIOR_FACTOR, (2, 5)), (PRIOR_MEAN, (3, 0)), (LOG_NOISE, (0,)),
                        ("body.0.weight", (1, 0))]:
        plus = {k: v.clone() for k, v in params.items()}
        minus = {k: v.clone() for k, v in params.items()}
        plus[name][index] += eps
        minus[name][index] -= eps
        numeric = (float(learner.task_gradient(plus, task)[1])
                   - float(learner.task_gradient(minus, task)[1])) / (2 * eps)
        assert gradient[name][index].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def test_learns_sinusoids_and_its_intervals_cover_the_targets():
    """100 meta-iterations of 4 tasks (MLP 1-40-40, Adam 3e-3), scored on held-out tasks at
    K=10. Measured: MSE 0.16 (a zero predictor scores about 4), 95% intervals cover 1.0 (still
    wide this early; the benchmark's longer runs reach 0.95)."""
    learner = make(hidden=(40, 40))
    family = Sinusoid(shots=10, queries=10)
    params = meta_train(learner, family, trainable(learner), iterations=100, meta_batch=4,
                        lr=0.003, vectorize=True)
    tasks = 100
    batch = family.batch("val", 1, range(tasks))
    params = {k: v.detach() for k, v in params.items()}
    mse = learner.batch_evaluate(params, batch, vectorize=True)["loss"] / tasks
    with torch.no_grad():
        mean, std = torch.vmap(lambda sx, sy, qx: learner.adapted_prediction(params, sx, sy, qx))(
            batch.support_x, batch.support_y, batch.query_x)
    coverage = float(((batch.query_y - mean).abs() <= 1.96 * std).float().mean())
    print(f"alpaca after 100 iterations: K=10 MSE {mse:.3f}, 95% coverage {coverage:.3f}")
    assert mse < 0.5
    assert 0.85 < coverage <= 1.0 and math.isfinite(float(std.max()))
