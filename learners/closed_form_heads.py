"""MetaOptNet's differentiable base learners: a multi-class linear SVM and ridge regression, each
fitted to one task's embedded support set in a form whose solution is differentiable with respect
to the embeddings. Pure tensor functions of one task (``torch.func.vmap`` maps them over tasks).

The SVM is Crammer and Singer's (2001) multi-class SVM, solved in its dual as MetaOptNet does
(Lee et al. 2019, in liblinear's notation)::

    min_alpha  1/2 sum_m |w_m|^2 - sum_i alpha[i, y_i],    w_m = sum_i alpha[i, m] x_i
    s.t.       alpha[i, m] <= C [m == y_i],   sum_m alpha[i, m] = 0

MetaOptNet hands this QP to a batched interior-point solver (qpth) and differentiates through its
KKT conditions. Here it is solved by a fixed number of accelerated projected-gradient steps
(FISTA), and the gradient into the embeddings is the exact derivative of those unrolled steps
(plain autograd through every iterate): no extra dependency, no data-dependent shapes, so it runs
under ``vmap`` and ``torch.func.grad``. The substitution ``beta = C onehot(y) - alpha`` turns
each row's constraints into the simplex ``{beta >= 0, sum beta = C}``, onto which projection is a
sort (Duchi et al. 2008; Condat 2016's closed form for the threshold).
"""

from __future__ import annotations

import torch
from torch import Tensor


def project_simplex(v: Tensor, total: float) -> Tensor:
    """Euclidean projection of each row of ``v`` onto ``{b >= 0, sum(b) = total}``."""
    ordered = torch.sort(v, dim=-1, descending=True).values
    counts = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype, device=v.device)
    # The threshold is the largest of the running means (cumsum - total) / k (Condat 2016).
    threshold = ((ordered.cumsum(dim=-1) - total) / counts).amax(dim=-1, keepdim=True)
    return (v - threshold).clamp(min=0)


def svm_dual(support: Tensor, onehot: Tensor, *, c: float, steps: int) -> Tensor:
    """Dual variables ``alpha`` ``[support, ways]`` of the Crammer-Singer SVM on embeddings
    ``support`` ``[support, features]`` with one-hot labels, after ``steps`` FISTA steps from
    ``alpha = 0`` with step ``1 / lambda_max(K)``, ``K`` the support Gram matrix."""
    gram = support @ support.transpose(0, 1)
    # The dual objective's gradient is (K alpha - onehot) and its Lipschitz constant K's largest
    # eigenvalue; eigvalsh's derivative needs no eigenvalue gaps, so it stays in the graph. LAPACK
    # refuses NaN, so a diverged embedding yields a NaN loss (the trainer stops) and no crash.
    step = 1 / torch.linalg.eigvalsh(gram.nan_to_num())[-1].clamp(min=1e-12)
    bound = c * onehot
    # Iterate on beta = bound - alpha, whose rows live on the simplex {beta >= 0, sum = C}: a
    # gradient step on alpha is the affine map beta -> A beta + b, precomputed once.
    eye = torch.eye(len(support), dtype=support.dtype, device=support.device)
    a = eye - step * gram
    b = step * (gram @ bound - onehot)
    beta = momentum = bound
    t = torch.ones((), dtype=onehot.dtype, device=onehot.device)
    for _ in range(steps):
        new = project_simplex(a @ momentum + b, c)
        # Adaptive restart (O'Donoghue and Candes 2015): drop the momentum when it points uphill,
        # which turns FISTA's oscillation on ill-conditioned Gram matrices into linear convergence.
        t = torch.where(((momentum - new) * (new - beta)).sum() > 0, 1.0, t)
        t_next = (1 + torch.sqrt(1 + 4 * t * t)) / 2
        momentum = new + ((t - 1) / t_next) * (new - beta)
        beta, t = new, t_next
    return bound - beta


def svm_weights(support: Tensor, onehot: Tensor, *, c: float, steps: int) -> Tensor:
    """The SVM's class weight vectors ``[ways, features]``: ``w_m = sum_i alpha[i, m] x_i``."""
    return svm_dual(support, onehot, c=c, steps=steps).transpose(0, 1) @ support


def ridge_weights(support: Tensor, onehot: Tensor, *, lam: float) -> Tensor:
    """Ridge regression onto the one-hot labels, ``[ways, features]``, in its dual (Woodbury) form
    ``W = Y^T (X X^T + lam I)^-1 X``: a ``support x support`` solve, cheap when the embedding is
    wider than the support set (Bertinetto et al. 2019's R2-D2 head)."""
    gram = support @ support.transpose(0, 1)
    eye = torch.eye(len(support), dtype=support.dtype, device=support.device)
    return torch.linalg.solve(gram + lam * eye, onehot).transpose(0, 1) @ support
