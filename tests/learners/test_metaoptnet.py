"""MetaOptNet: the SVM head solves its QP, its gradient is right, and the learner learns Omniglot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from learners.backbones import build_backbone
from learners.base import Objective
from learners.closed_form_heads import ridge_weights, svm_dual, svm_weights
from learners.metaoptnet import MetaOptNet
from pipelines.episodes import EpisodeFamily

from meta_training import meta_train, trainable

DEFAULTS = MetaOptNet.Hyperparameters()


def problem(ways: int = 5, shots: int = 2, features: int = 12, *, seed: int = 0):
    """Embeddings shaped like a ReLU network's (non-negative, a shared mean, class offsets)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(ways).repeat_interleave(shots)
    centres = torch.randn(ways, features, generator=generator, dtype=torch.float64)
    x = (centres[labels] + torch.randn(len(labels), features, generator=generator,
                                       dtype=torch.float64)).relu() + 0.3
    onehot = (labels.unsqueeze(-1) == torch.arange(ways)).to(torch.float64)
    return x, onehot


@pytest.mark.parametrize("ways, shots, c", [(5, 2, 0.1), (5, 1, 1.0), (20, 1, 0.1)])
def test_svm_solution_satisfies_kkt_conditions(ways, shots, c):
    """At the test-time step count: primal and dual feasibility, complementary slackness and a
    zero duality gap against the Crammer-Singer primal, all to 1e-6."""
    x, onehot = problem(ways, shots)
    alpha = svm_dual(x, onehot, c=c, steps=DEFAULTS.svm_test_steps)
    tol = 1e-6
    # Feasibility: alpha[i, m] <= C [m == y_i] and each row sums to zero.
    slack = c * onehot - alpha
    assert slack.min() >= -tol
    assert alpha.sum(dim=1).abs().max() <= tol
    # Stationarity: gradient + nu_i + mu_im = 0 with mu >= 0. The free coordinates of a row must
    # share one gradient value (-nu_i) and the bound ones lie below it, so mu_im is the gap to the
    # row's largest gradient; complementary slackness asks mu * slack = 0.
    gradient = x @ x.T @ alpha - onehot
    mu = gradient.amax(dim=1, keepdim=True) - gradient
    assert (mu * slack).abs().max() <= tol
    # Strong duality: the primal objective 1/2 |W|^2 + C sum_i max_m (1 - [m = y_i] + w_m x_i -
    # w_{y_i} x_i) at W = alpha^T X equals the dual's.
    weights = alpha.T @ x
    scores = x @ weights.T
    hinge = (1 - onehot + scores - (scores * onehot).sum(1, keepdim=True)).amax(dim=1)
    primal = 0.5 * (weights ** 2).sum() + c * hinge.sum()
    dual = -0.5 * (weights ** 2).sum() + (alpha * onehot).sum()
    assert abs(primal - dual) <= tol * max(1.0, abs(primal))


@pytest.mark.parametrize("steps", [DEFAULTS.svm_steps, DEFAULTS.svm_test_steps])
def test_svm_gradient_matches_finite_differences(steps):
    x, onehot = problem(4, 2, 6, seed=1)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda e: svm_weights(e, onehot, c=DEFAULTS.svm_c, steps=steps), (x,), eps=1e-6,
        atol=1e-6, rtol=1e-4, fast_mode=True)


def test_ridge_head_is_the_primal_ridge_solution_and_differentiable():
    x, onehot = problem(5, 2, 30, seed=2)
    lam = DEFAULTS.ridge_lambda
    primal = torch.linalg.solve(x.T @ x + lam * torch.eye(x.shape[1], dtype=x.dtype), x.T @ onehot)
    torch.testing.assert_close(ridge_weights(x, onehot, lam=lam), primal.T)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: ridge_weights(e, onehot, lam=lam), (x,),
                                     fast_mode=True)


def make(input_shape, *, filters: int = 8, **knobs) -> MetaOptNet:
    backbone = build_backbone("conv4", input_shape, None, filters=filters)
    return MetaOptNet(backbone, Objective.for_task_kind("classification"),
                      MetaOptNet.Hyperparameters(**knobs))


@pytest.mark.parametrize("head", ["svm", "ridge"])
def test_serves_any_number_of_classes(head):
    learner = make((1, 28, 28), filters=4, head=head)
    params = learner.init_params(0)
    assert learner.servable_ways(params) is None
    assert learner.needs_head is False and learner.uses_inner_steps is False
    for ways in (3, 7):
        support_y = torch.arange(ways)
        logits = learner.adapted_outputs(params, torch.randn(ways, 1, 28, 28), support_y,
                                         torch.randn(4, 1, 28, 28))
        assert logits.shape == (4, ways) and torch.isfinite(logits).all()


def test_learns_held_out_omniglot_alphabets(omniglot_dir: Path):
    """30 meta-iterations of 5-way 1-shot (Conv-4, 8 filters) on the small Omniglot set, scored on
    the test split's alphabet, never seen in training. Measured: 0.34 untrained, 0.53 after;
    over seeds 0-11 (initial weights and training episodes) 0.49-0.61 after."""
    family = EpisodeFamily(omniglot_dir, ways=5, shots=1, queries=5)
    learner = make(family.input_shape())
    params = meta_train(learner, family, trainable(learner), iterations=30, meta_batch=2,
                        lr=0.03)
    tests = 50
    # vmapped: the solver's small steps run once for all tasks (3x faster here than a loop).
    stats = learner.batch_evaluate(params, family.batch("test", 1, range(tests)), vectorize=True)
    accuracy = stats["accuracy"] / tests
    print(f"metaoptnet 5-way 1-shot on held-out alphabets after 30 iterations: {accuracy:.3f}")
    assert accuracy > 0.42
