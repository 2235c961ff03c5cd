"""ALPaCA: Bayesian linear regression on learned features (Harrison, Sharma and Pavone, 2018).

The meta-parameters are the feature network phi (a backbone without a head), the prior over the
last layer -- mean ``K0`` [features, outputs] and precision ``Lambda0 = L L^T + eps I`` -- and a
diagonal noise variance ``Sigma_eps`` (log-parameterised). ``adapt`` solves the posterior in closed
form: ``Lambda_n = Phi^T Phi + Lambda0`` (returned as its Cholesky factor) and
``K_n = Lambda_n^-1 (Phi^T Y + Lambda0 K0)``. A query's prediction is Gaussian, mean
``K_n^T phi`` and variance ``(1 + phi^T Lambda_n^-1 phi) Sigma_eps``; meta-training minimises the
exact negative log-likelihood of the query targets under it. As in the paper, training sees every
context size 0..K (here deterministically: the loss averages over all prefixes of the support set
instead of drawing one size per task). Not from the paper: the jitter ``eps`` and solving in
double precision (numerical safety); ``Sigma_eps`` starts at 1 and ``L`` at the identity.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor
from torch.func import grad

from learners.backbones import call
from learners.base import Adapted, Hyperparameters, Learner, Params
from pipelines.base import Task

PRIOR_MEAN, PRIOR_FACTOR, LOG_NOISE = "prior.mean", "prior.factor", "noise.log_variance"
OWN_KEYS = (PRIOR_MEAN, PRIOR_FACTOR, LOG_NOISE)
# Added to L L^T so the prior precision stays positive definite whatever L becomes.
JITTER = 1e-6
SOLVE_DTYPE = torch.float64


class ALPaCAHyperparameters(Hyperparameters):
    variable_context: bool = Field(
        True, description="meta-train on every prefix of the support set (0..K points), the "
        "expected loss of the paper's context size drawn uniformly from 0..K, so one model "
        "serves any K; false: only the whole support set")


class ALPaCA(Learner):
    """ALPaCA with a learned prior, learned diagonal noise and the exact predictive likelihood."""

    name = "alpaca"
    family = "closed-form"
    Hyperparameters = ALPaCAHyperparameters
    needs_head = False
    task_kinds = ("regression",)
    search_space = {"outer_lr": {"low": 0.0003, "high": 0.01, "log": True}}

    def initial_params(self, generator: torch.Generator) -> Params:
        params = super().initial_params(generator)
        if self.output_size is None:
            raise ValueError("alpaca needs the width of the targets: set learner.output_size "
                             "(build_learner does)")
        features = self.backbone.feature_size
        # A Glorot-scaled prior mean as in the authors' code; the prior precision starts at I.
        # Drawn from a stream of its own, started from the same seed (as it always has been).
        prior = torch.Generator().manual_seed(generator.initial_seed())
        params[PRIOR_MEAN] = torch.randn(features, self.output_size, generator=prior) * \
            math.sqrt(2.0 / (features + self.output_size))
        params[PRIOR_FACTOR] = torch.eye(features)
        params[LOG_NOISE] = torch.zeros(self.output_size)
        return params

    def features(self, params: Params, x: Tensor) -> Tensor:
        body = {k: v for k, v in params.items() if k not in OWN_KEYS}
        return call(self.backbone, body, x).flatten(start_dim=1)

    def posterior(self, params: Params, gram: Tensor, cross: Tensor) -> Adapted:
        """The posterior from the support statistics ``Phi^T Phi`` and ``Phi^T Y`` (any leading
        dimensions): the Cholesky factor of ``Lambda_n`` (in double precision) and the mean
        ``K_n``."""
        # Solved in double precision: on noiseless tasks the learned noise variance falls to the
        # feature misfit and the prior precision with it, far below what float32 can factor.
        factor = params[PRIOR_FACTOR].to(SOLVE_DTYPE)
        prior = factor @ factor.mT + JITTER * torch.eye(len(factor), dtype=SOLVE_DTYPE,
                                                         device=factor.device)
        cholesky = torch.linalg.cholesky(gram.to(SOLVE_DTYPE) + prior)
        mean = torch.cholesky_solve(
            cross.to(SOLVE_DTYPE) + prior @ params[PRIOR_MEAN].to(SOLVE_DTYPE), cholesky)
        return {"mean": mean.to(cross.dtype), "cholesky": cholesky}

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor, *,
              ways: int | None = None, steps: int | None = None) -> Adapted:
        phi = self.features(params, support_x)
        return self.posterior(params, phi.mT @ phi, phi.mT @ support_y)

    def predictive(self, params: Params, adapted: Adapted, query_x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance ``[queries, outputs]`` (with the leading dimensions of ``adapted``)."""
        phi = self.features(params, query_x)
        mean = phi @ adapted["mean"]
        cholesky = adapted["cholesky"]
        # phi^T Lambda_n^-1 phi = |C^-1 phi|^2 for Lambda_n = C C^T.
        whitened = torch.linalg.solve_triangular(
            cholesky, phi.mT.to(cholesky.dtype).expand(*cholesky.shape[:-2], *phi.mT.shape),
            upper=False)
        spread = 1 + whitened.square().sum(dim=-2).to(phi.dtype)
        return mean, spread.unsqueeze(-1) * params[LOG_NOISE].exp()

    def predict(self, params: Params, adapted: Adapted, query_x: Tensor) -> Tensor:
        return self.predictive(params, adapted, query_x)[0]

    def predict_distribution(self, params: Params, adapted: Adapted,
                             query_x: Tensor) -> tuple[Tensor, Tensor]:
        mean, variance = self.predictive(params, adapted, query_x)
        return mean, variance.sqrt()

    def task_gradient(self, params: Params, task: Task, *,
                      ways: int | None = None) -> tuple[Params, Tensor, Tensor]:
        """The gradient of the queries' negative log-likelihood (the loss statistic is it too);
        outputs are the predictive means after the whole support set."""

        def query_nll(p: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            mean, variance = self.prefix_predictive(p, task)
            if not self.hparams.variable_context:
                mean, variance = mean[-1:], variance[-1:]
            loss = gaussian_nll(mean, variance, task.query_y)
            return loss, (loss.detach(), mean[-1].detach())

        gradient, (loss, outputs) = grad(query_nll, has_aux=True)(params)
        return gradient, loss, outputs

    def prefix_predictive(self, params: Params, task: Task) -> tuple[Tensor, Tensor]:
        """The queries' predictive mean and variance after each prefix of the support set,
        ``[K + 1, queries, outputs]`` for 0..K points, from one K x K Cholesky factorisation.

        The same posterior as ``adapt``, in its kernel form: with prior covariance
        ``S = Lambda0^-1`` and ``k(a, b) = phi(a)^T S phi(b)``, the mean is
        ``phi^T K0 + k_qn (I + K_nn)^-1 (Y - Phi K0)`` and the variance factor
        ``1 + k_qq - k_qn (I + K_nn)^-1 k_nq``. The Cholesky factor of every leading block of
        ``I + K_nn`` is the leading block of its factor, and forward substitution solves the
        first n rows with the first n rows alone, so prefix n sums the first n terms.
        """
        phi_s = self.features(params, task.support_x)
        phi_q = self.features(params, task.query_x)
        prior_mean = params[PRIOR_MEAN]
        factor = params[PRIOR_FACTOR].to(SOLVE_DTYPE)
        eye = torch.eye(len(factor), dtype=SOLVE_DTYPE, device=factor.device)
        prior = torch.linalg.cholesky(factor @ factor.mT + JITTER * eye)
        # S^1/2 phi for support and queries: k(a, b) is the dot product of their columns.
        w_s = torch.linalg.solve_triangular(prior, phi_s.mT.to(SOLVE_DTYPE), upper=False)
        w_q = torch.linalg.solve_triangular(prior, phi_q.mT.to(SOLVE_DTYPE), upper=False)
        shots = w_s.shape[-1]
        kernel = torch.eye(shots, dtype=SOLVE_DTYPE, device=factor.device) + w_s.mT @ w_s
        cholesky = torch.linalg.cholesky(kernel)
        z = torch.linalg.solve_triangular(cholesky, w_s.mT @ w_q, upper=False)  # [K, queries]
        residual = (task.support_y - phi_s @ prior_mean).to(SOLVE_DTYPE)
        u = torch.linalg.solve_triangular(cholesky, residual, upper=False)  # [K, outputs]

        def prefix_sums(terms: Tensor) -> Tensor:
            return torch.cat([torch.zeros_like(terms[:1]), terms.cumsum(dim=0)])

        correction = prefix_sums(z.unsqueeze(-1) * u.unsqueeze(-2)).to(phi_q.dtype)
        mean = phi_q @ prior_mean + correction
        spread = 1 + w_q.square().sum(dim=0) - prefix_sums(z.square())
        variance = spread.to(phi_q.dtype).unsqueeze(-1) * params[LOG_NOISE].exp()
        return mean, variance


def gaussian_nll(mean: Tensor, variance: Tensor, targets: Tensor) -> Tensor:
    """Negative log-density of ``targets`` under independent normals, summed over the output
    dimension and averaged over queries (and any leading dimensions)."""
    terms = torch.log(2 * math.pi * variance) + (targets - mean).square() / variance
    return 0.5 * terms.sum(dim=-1).mean()
