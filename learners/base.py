"""The one interface every meta-learning algorithm in orch implements.

A learner turns *meta-parameters* (a flat ``dict[str, Tensor]``) and a task's support set into an
*adapted state*, and turns an adapted state and query inputs into predictions. Everything the
orchestrator does -- meta-training, farming task shards to Ray workers, validation, serving a
registered model -- goes through the four verbs below, so a new algorithm is one file.

    init_params(seed)                         -> meta-parameters
    adapt(params, support_x, support_y, ...)  -> adapted state (an opaque dict of tensors)
    predict(params, adapted, query_x)         -> outputs (regression values or class logits)
    task_gradient(params, task)               -> this task's contribution to the outer update

``adapt`` and ``predict`` are pure functions of their arguments (no module state changes), so the
same code serves training, evaluation and ``orch predict``. ``task_gradient`` defaults to the
gradient of the query loss through ``adapt``; algorithms whose outer update is not a loss gradient
(Reptile) override it. Shards of a meta-batch return the *sum* of their tasks' contributions so
that a driver can add shards from any number of workers and divide once by the task count.

How each family maps onto it:

- Gradient-based (MAML, first-order MAML, Reptile, Meta-SGD, ANIL, MAML++, Self-Critique and
  Adapt): ``params`` are the backbone's initial weights plus any learned inner-loop state
  (Meta-SGD's per-weight learning rates, MAML++'s per-step rates, SCA's critic); ``adapt`` runs
  the functional inner loop of ``learners.functional`` and returns the fast weights; ``predict``
  calls the backbone with them. ANIL adapts only the head entries of the dict.
- Metric-based (Prototypical, Matching with full-context embeddings, Relation, Siamese):
  ``adapt`` embeds the support set and returns what a query is compared against (class
  prototypes, the FCE-encoded support, support embeddings and labels); ``predict`` returns
  logits from distances, attention or a learned relation module held in ``params``.
- Closed-form heads (MetaOptNet, ALPaCA): ``adapt`` embeds the support set and solves the head in
  closed form (differentiable SVM/ridge dual, Bayesian linear regression posterior), returning
  the head's weights (and ALPaCA's posterior covariance); ``predict`` applies them to embedded
  queries. Gradients flow through the solver into the embedding.
- Model-based (SNAIL, MetaNet): ``adapt`` returns the support set itself, embedded (SNAIL) or with
  the fast weights MetaNet's meta-learner generates from support-loss gradients; ``predict`` runs
  the sequence model over support-then-query (SNAIL) or the base network with generated weights.
- Learned optimisers (the LSTM meta-learner of Ravi and Larochelle): ``params`` hold the learner
  network's initial weights *and* the LSTM's weights; ``adapt`` unrolls the LSTM-produced updates
  over the support set; ``task_gradient`` is the query-loss gradient with respect to both.

A learner never imports Ray, MLflow or Optuna.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from pipelines.base import Task

Params = dict[str, Tensor]
Adapted = dict[str, Tensor]


class Hyperparameters(BaseModel):
    """Knobs of one algorithm; subclasses add fields, each with a comment saying what it does.

    Every field is searchable from a sweep file: ``algorithms.<name>.<field>`` may be a fixed value
    or a range. Unknown fields are refused so a typo fails at load time, not after a day of compute.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


def mse_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean squared error for regression tasks (targets shaped like outputs)."""
    return torch.nn.functional.mse_loss(outputs, targets)


def cross_entropy_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy for classification tasks (integer targets, logits outputs)."""
    return torch.nn.functional.cross_entropy(outputs, targets)


@dataclass(frozen=True)
class Objective:
    """What a task family asks of a learner: its loss, and whether outputs are class logits."""

    loss: Callable[[Tensor, Tensor], Tensor]
    classification: bool
    ways: int | None = None

    @staticmethod
    def for_task_kind(kind: str, *, ways: int | None = None) -> "Objective":
        if kind == "regression":
            return Objective(loss=mse_loss, classification=False)
        if kind == "classification":
            return Objective(loss=cross_entropy_loss, classification=True, ways=ways)
        raise ValueError(f"unknown task kind {kind!r}; allowed: regression, classification")


class Learner(abc.ABC):
    """A meta-learning algorithm: see the module docstring for the contract."""

    name: ClassVar[str]
    Hyperparameters: ClassVar[type[Hyperparameters]] = Hyperparameters
    # False for learners with no per-task gradient steps (metric-based, closed-form): their
    # ``adapt`` ignores ``steps``.
    uses_inner_steps: ClassVar[bool] = True
    # False for learners whose backbone ends at the embedding (metric-based): ``build_learner``
    # then builds it without the linear output head.
    needs_head: ClassVar[bool] = True

    def __init__(self, backbone: torch.nn.Module, objective: Objective, hparams: Hyperparameters):
        self.backbone = backbone
        self.objective = objective
        self.hparams = hparams

    # -- the four verbs ----------------------------------------------------------------------

    def init_params(self, seed: int) -> Params:
        """Fresh meta-parameters, the same for the same seed on any machine."""
        torch.manual_seed(seed)
        for module in self.backbone.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        return {name: p.detach().clone() for name, p in self.backbone.named_parameters()}

    @abc.abstractmethod
    def adapt(
        self, params: Params, support_x: Tensor, support_y: Tensor, *, steps: int | None = None
    ) -> Adapted:
        """Adapt to one task's support set; differentiable with respect to ``params``."""

    @abc.abstractmethod
    def predict(self, params: Params, adapted: Adapted, query_x: Tensor) -> Tensor:
        """Outputs for query inputs after adaptation (values, or logits over the task's classes)."""

    def task_gradient(self, params: Params, task: Task) -> tuple[Params, dict[str, float]]:
        """This task's contribution to the outer update, and its training statistics.

        Default: the gradient of the query loss after ``adapt`` (MAML-style, second order if the
        learner's ``adapt`` keeps the graph).
        """
        leaves = {name: p.detach().requires_grad_(True) for name, p in params.items()}
        adapted = self.adapt(leaves, task.support_x, task.support_y)
        outputs = self.predict(leaves, adapted, task.query_x)
        loss = self.objective.loss(outputs, task.query_y)
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        gradient = {
            name: (g if g is not None else torch.zeros_like(leaves[name]))
            for name, g in zip(leaves, grads)
        }
        return gradient, self.statistics(outputs.detach(), task.query_y, loss.detach())

    # -- shared helpers ----------------------------------------------------------------------

    def evaluate(self, params: Params, task: Task, *, steps: int | None = None) -> dict[str, float]:
        """Query loss (and accuracy for classification) after adapting on the support set."""
        with torch.enable_grad():  # gradient-based adaptation needs autograd even at test time
            adapted = self.adapt(params, task.support_x, task.support_y, steps=steps)
        with torch.no_grad():
            outputs = self.predict(params, {k: v.detach() for k, v in adapted.items()}, task.query_x)
            loss = self.objective.loss(outputs, task.query_y)
        return self.statistics(outputs, task.query_y, loss)

    def statistics(self, outputs: Tensor, targets: Tensor, loss: Tensor) -> dict[str, float]:
        stats = {"loss": float(loss)}
        if self.objective.classification:
            stats["accuracy"] = float((outputs.argmax(dim=-1) == targets).float().mean())
        return stats

    def describe(self) -> dict[str, Any]:
        """Plain-data description of this learner, stored with every saved model."""
        return {"algorithm": self.name, "hparams": self.hparams.model_dump()}
