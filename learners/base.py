"""The one interface every meta-learning algorithm in orch implements.

A learner turns *meta-parameters* (a flat ``dict[str, Tensor]``) and a task's support set into an
*adapted state*, and turns an adapted state and query inputs into predictions. Everything the
orchestrator does -- meta-training, farming task shards to Ray workers, validation, serving a
registered model -- goes through the four verbs below, so a new algorithm is one file.

    init_params(seed)                         -> meta-parameters (a learner extends initial_params)
    adapt(params, support_x, support_y, ways=...)  -> adapted state (an opaque dict of tensors)
    predict(params, adapted, query_x)         -> outputs (regression values or class logits)
    predict_distribution(params, adapted, query_x) -> (mean, std), or None without uncertainty
    task_gradient(params, task)               -> this task's contribution to the outer update

``adapt`` and ``predict`` are pure functions of their arguments (no module state changes), so the
same code serves training, evaluation and ``orch predict``. The number of classes of a
classification task is read from the task itself -- its support labels are ``0..ways-1``, see
``task_ways`` -- and handed to ``adapt`` as ``ways``, never taken from how the model was trained:
a metric learner trained 5-way classifies among the 20 classes of a 20-way support set. ``task_gradient`` defaults to the
gradient of the query loss through ``adapt``; algorithms whose outer update is not a loss gradient
(Reptile) override it. Shards of a meta-batch return the *sum* of their tasks' contributions so
that a driver can add shards from any number of workers and divide once by the task count.

How each family (``Learner.family``, one of ``FAMILIES``) maps onto it:

- ``gradient`` (MAML, first-order MAML, Reptile, Meta-SGD, ANIL, MAML++, Self-Critique and
  Adapt): ``params`` are the backbone's initial weights plus any learned inner-loop state
  (Meta-SGD's per-weight learning rates, MAML++'s per-step rates, SCA's critic); ``adapt`` runs
  the functional inner loop of ``learners.functional`` and returns the fast weights; ``predict``
  calls the backbone with them. ANIL adapts only the head entries of the dict.
- ``metric`` (Prototypical, Matching with full-context embeddings, Relation, Siamese):
  ``adapt`` embeds the support set and returns what a query is compared against (class
  prototypes, the FCE-encoded support, support embeddings and labels); ``predict`` returns
  logits from distances, attention or a learned relation module held in ``params``.
- ``closed-form`` heads (MetaOptNet, ALPaCA): ``adapt`` embeds the support set and solves the
  head in closed form (differentiable SVM/ridge dual, Bayesian linear regression posterior),
  returning the head's weights (and ALPaCA's posterior covariance); ``predict`` applies them to
  embedded queries. Gradients flow through the solver into the embedding.
- ``model-based`` (SNAIL, MetaNet): ``adapt`` returns the support set itself, embedded (SNAIL) or
  with the fast weights MetaNet's meta-learner generates from support-loss gradients; ``predict``
  runs the sequence model over support-then-query (SNAIL) or the base network with generated
  weights.
- Learned optimisers, in the ``gradient`` family (the LSTM meta-learner of Ravi and Larochelle):
  ``params`` hold the learner network's initial weights *and* the LSTM's weights; ``adapt``
  unrolls the LSTM-produced updates over the support set; ``task_gradient`` is the query-loss
  gradient with respect to both.
- ``pretrained`` (Baseline, Baseline++, SimpleShot): not meta-learned at all. ``params`` are a
  backbone and a classifier over every class of the training split, trained by ordinary
  minibatch cross-entropy: ``training_batch`` gives them labelled minibatch shards instead of
  episodes, and ``batch_gradient`` sums the shards' gradients (``learners/pretraining.py``).
  ``adapt`` fits a new head on the support features (Baseline, Baseline++) or averages them
  into class means (SimpleShot); validation stays episodic, so they compare with the rest.

Learners whose adaptation compares fixed embeddings of the inputs (ProtoNet, MetaOptNet and the
pretrained ones) declare ``embeds`` and give them by ``embedding``: transductive inference
(``learners/transduction.py``) classifies an episode's queries together on them.

A learner never imports Ray, MLflow or Optuna.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from torch.func import grad, vmap

from learners.functional import fresh_params, plain_autograd
from pipelines.base import Task, TaskBatch, TaskFamily

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
    """What a task family asks of a learner: its loss, and whether outputs are class logits.

    It holds no number of classes on purpose: that is a property of each task (``task_ways``).
    """

    loss: Callable[[Tensor, Tensor], Tensor]
    classification: bool

    @staticmethod
    def for_task_kind(kind: str) -> "Objective":
        if kind == "regression":
            return Objective(loss=mse_loss, classification=False)
        if kind == "classification":
            return Objective(loss=cross_entropy_loss, classification=True)
        raise ValueError(f"unknown task kind {kind!r}; allowed: regression, classification")


def task_ways(support_y: Tensor) -> int:
    """The number of classes of a classification task: its support labels are ``0..ways-1``.

    Reads tensor values, so it runs outside ``vmap``; batch code calls it once per batch (every
    task of a batch has the same number of classes) and passes the result down as ``ways``."""
    return int(support_y.max()) + 1


# The families of the module docstring, in the order the registry, the README's algorithm table
# and the contract test ids list them.
FAMILIES = ("gradient", "metric", "closed-form", "model-based", "pretrained")


class Learner(abc.ABC):
    """A meta-learning algorithm: see the module docstring for the contract."""

    name: ClassVar[str]
    # One of ``FAMILIES``, declared by every algorithm (or inherited from the one it extends):
    # the registry groups learners by it and the contract tests are named after it.
    family: ClassVar[str]
    Hyperparameters: ClassVar[type[Hyperparameters]] = Hyperparameters
    # Whether ``adapt`` takes per-task gradient steps (its ``steps`` argument; the other families'
    # learners ignore it): set from ``family`` for each subclass, so it is never declared twice.
    uses_inner_steps: ClassVar[bool]
    # False for learners whose backbone ends at the embedding (metric-based): ``build_learner``
    # then builds it without the linear output head.
    needs_head: ClassVar[bool] = True
    # The task kinds the method is defined for: a sweep pairing it with another kind of data
    # fails at load time.
    task_kinds: ClassVar[tuple[str, ...]] = ("regression", "classification")
    # Backbones the method cannot run on, each with why: a sweep pairing one with the method
    # fails at load time with that reason (tests/learners/test_backbones.py runs every other pair).
    unsupported_backbones: ClassVar[dict[str, str]] = {}
    # The outer learning-rate schedule the trainer applies: "constant" or "cosine" (MAML++).
    outer_schedule: ClassVar[str] = "constant"
    # The default search space: knob -> a fixed value, {low, high, log, int} or {choices: [...]}
    # in the sweep file's syntax. Optuna searches it for every knob a sweep file leaves out;
    # ``outer_lr`` and ``meta_batch`` may appear besides the Hyperparameters fields.
    search_space: ClassVar[dict[str, Any]] = {"outer_lr": {"low": 0.0003, "high": 0.003, "log": True}}
    # How far running statistics among the meta-parameters (``is_statistic``) move toward the
    # meta-batch's values per iteration.
    statistics_momentum: ClassVar[float] = 0.1
    # False keeps image batches NCHW in that loop (``autograd_batch_gradient``).
    channels_last_images: ClassVar[bool] = True
    # True where adaptation compares fixed embeddings of the inputs (``embedding``), which
    # transductive inference (learners/transduction.py) can then work on.
    embeds: ClassVar[bool] = False
    # Why ``training.inner_checkpointing`` cannot apply to this learner (the end of a sentence
    # that starts with its name), or None where ``adapt`` recomputes its inner loop in segments
    # (``functional.gradient_steps``' ``recompute_every``). Declared by each class itself, never
    # inherited: a subclass that changes the inner loop must not inherit the claim.
    inner_checkpointing_refusal: ClassVar[str | None]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.uses_inner_steps = getattr(cls, "family", None) == "gradient"
        if "inner_checkpointing_refusal" not in vars(cls):
            cls.inner_checkpointing_refusal = (
                "has an inner loop that inner checkpointing does not recompute"
                if cls.uses_inner_steps else "takes no inner gradient steps")

    def __init__(self, backbone: torch.nn.Module, objective: Objective, hparams: Hyperparameters):
        self.backbone = backbone
        self.objective = objective
        self.hparams = hparams
        # The fraction of meta-training done, in [0, 1]; ``batch_gradient`` sets it for the
        # learners whose training anneals (MAML++'s step weights and derivative order).
        self.progress = 0.0
        # The width of a task's targets (regression) or the trained ways; ``build_learner`` sets
        # it, for learners that size parameters by it without an output head (ALPaCA's prior).
        self.output_size: int | None = None
        # The number of classes of the training split (rotations counted as classes), for
        # learners that pretrain a classifier over all of them; ``build_learner`` sets it where
        # the data has such classes.
        self.classes: int | None = None
        # ``training.inner_checkpointing``: inner steps per recomputed segment, or None to keep
        # every step's activations; only where ``inner_checkpointing_refusal`` is None.
        self.inner_checkpointing: int | None = None

    # -- the four verbs ----------------------------------------------------------------------

    def init_params(self, seed: int) -> Params:
        """Fresh meta-parameters, the same for the same seed on any machine. Drawn from a
        generator of their own: torch's global random state is neither read nor changed, so
        building a learner does not move the caller's random numbers."""
        return self.initial_params(torch.Generator().manual_seed(seed))

    def initial_params(self, generator: torch.Generator) -> Params:
        """What ``init_params`` returns, drawn from ``generator`` (the backbone first, then
        whatever a learner adds, in a fixed order). Learners with meta-parameters beyond the
        backbone's extend this, not ``init_params``."""
        return fresh_params(self.backbone, generator)

    @abc.abstractmethod
    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor, *,
              ways: int | None = None, steps: int | None = None) -> Adapted:
        """Adapt to one task's support set; differentiable with respect to ``params``.

        ``ways`` is the task's number of classes (classification; ``task_ways(support_y)`` when
        None, which needs concrete labels, so code under ``vmap`` passes it). ``steps`` overrides
        the number of inner steps of learners that take any."""

    def adaptation_steps(self, support_size: int, steps: int | None = None) -> int:
        """Gradient steps one ``adapt`` takes on a support set of ``support_size`` examples
        (``steps`` overriding the trained inner steps, as ``adapt``'s argument does): what ``orch
        compare`` reports beside the milliseconds. The trained ``inner_steps`` (plus SCA's
        ``critic_steps`` on the unlabelled queries) for the gradient family; 0 for learners that
        adapt without gradient steps (a forward pass, a closed-form or iterative head solve,
        generated weights); a learner fitting a head by SGD counts that fit's steps."""
        if not self.uses_inner_steps:
            return 0
        h = self.hparams
        return (h.inner_steps if steps is None else steps) + getattr(h, "critic_steps", 0)

    def predict_distribution(self, params: Params, adapted: Adapted,
                             query_x: Tensor) -> tuple[Tensor, Tensor] | None:
        """Regression learners whose predictions are Gaussian (ALPaCA): the predictive mean,
        shaped like ``predict``'s outputs, and standard deviation. None (the default) for
        learners whose predictions carry no uncertainty."""
        return None

    def embedding(self, params: Params, x: Tensor) -> Tensor:
        """The features ``[n, d]`` of inputs ``x`` that adaptation compares, for the learners
        that declare ``embeds``: transductive methods classify queries on them."""
        raise TypeError(f"{self.name} adapts without a fixed embedding of its inputs")

    def feature_mean(self, params: Params) -> Tensor | None:
        """The mean feature of the training images, where the learner keeps one (SimpleShot's
        centring): transductive methods that centre features (LaplacianShot's CL2N) use it."""
        return None

    def is_statistic(self, name: str) -> bool:
        """Whether meta-parameter ``name`` is a running statistic rather than a weight (MAML++'s
        per-step BatchNorm statistics). For a statistic, ``task_gradient`` returns its value minus
        the task's, and the trainer moves it by ``statistics_momentum`` times the meta-batch mean
        of that, outside the outer optimiser: a moving average, the same on any number of
        workers."""
        return False

    def servable_ways(self, params: Params) -> int | None:
        """The most classes one task may have for these meta-parameters: None for any number
        (metric, closed-form and model-based learners, gradient learners with an any-way head);
        the number of rows of a fixed output head otherwise. Read from the weights, not from the
        module, which may have been built for another task shape. Fewer are always served."""
        if not self.objective.classification or "head.weight" not in params:
            return None
        return params["head.weight"].shape[0]

    @classmethod
    def check_task_shape(cls, hparams: Hyperparameters, *, ways: int, support: int) -> None:
        """Refuse, in one line naming the knob, a task shape that a model built with ``hparams``
        cannot serve (``ways`` classes, ``support`` examples in the support set). A classmethod,
        so a sweep file is checked at load time, before any learner is built. Default: any."""

    def check_ways(self, params: Params, ways: int) -> None:
        """Refuse a task with more classes than ``servable_ways``, in one line."""
        most = self.servable_ways(params)
        if most is not None and ways > most:
            raise ValueError(f"this {self.name} model has a {most}-way output head; it cannot "
                             f"tell {ways} classes apart (train it with the any-way head knob, "
                             f"head: zero or shared, or use a metric learner such as protonet)")

    def task_gradient(self, params: Params, task: Task, *,
                      ways: int | None = None) -> tuple[Params, Tensor, Tensor]:
        """This task's contribution to the outer update, its query loss and query outputs.

        A pure function (``torch.func`` only, no ``.item()``), so ``batch_gradient`` can ``vmap``
        it over tasks. Default: the gradient of the query loss through ``adapt`` -- second order
        when the learner's ``adapt`` keeps the inner graph.
        """

        def query_loss(p: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            loss, outputs = self.query_loss(p, task, ways=ways)
            return loss, (loss.detach(), outputs.detach())

        gradient, (loss, outputs) = grad(query_loss, has_aux=True)(params)
        return gradient, loss, outputs

    def query_loss(self, params: Params, task: Task, *,
                   ways: int | None = None) -> tuple[Tensor, Tensor]:
        """The task's query loss after adapting to its support set, and the query outputs: what
        the default ``task_gradient`` differentiates."""
        adapted = self.adapt(params, task.support_x, task.support_y, ways=ways)
        outputs = self.predict(params, adapted, task.query_x)
        return self.objective.loss(outputs, task.query_y), outputs

    # -- batches of tasks ------------------------------------------------------------------

    def training_batch(self, family: TaskFamily, split: str, seed: int,
                       indices: Sequence[int]) -> Any:
        """The training data of indices ``indices`` of ``split`` under ``seed``, in the form
        ``batch_gradient`` takes: the family's episodes (pretraining learners: labelled minibatch
        shards of its classes). A pure function of its arguments, so a Ray worker samples its own
        shard of an iteration."""
        return family.batch(split, seed, indices)

    def batch_gradient(self, params: Params, batch: TaskBatch, *, vectorize: bool = False,
                       progress: float | None = None) -> tuple[Params, dict[str, float]]:
        """Sum over the batch of each task's contribution, and summed statistics.

        ``vectorize`` maps ``task_gradient`` over tasks with ``torch.func.vmap``; the result equals
        the per-task loop (a contract test checks it). Whether it is faster depends on the backbone
        and device -- measured in benchmarks/vectorize.py -- so the caller decides. ``progress``
        (the fraction of meta-training done) is kept for learners that anneal.
        """
        if progress is not None:
            self.progress = progress
        params = {k: v.detach() for k, v in params.items()}
        ways = self.ways_of(batch.support_y)
        if vectorize:
            gradients, losses, outputs = vmap(
                lambda sx, sy, qx, qy: self.task_gradient(params, Task(sx, sy, qx, qy), ways=ways))(
                batch.support_x, batch.support_y, batch.query_x, batch.query_y)
            total = {k: g.sum(dim=0) for k, g in gradients.items()}
            return total, self.summed_statistics(outputs, batch.query_y, losses)
        if self.uses_autograd_loop():
            return self.autograd_batch_gradient(params, batch, ways=ways)
        total: Params = {}
        losses, outputs = [], []
        for i in range(len(batch)):
            gradient, loss, output = self.task_gradient(params, batch[i], ways=ways)
            for name, g in gradient.items():
                total[name] = total[name] + g if name in total else g
            losses.append(loss)
            outputs.append(output)
        return total, self.summed_statistics(torch.stack(outputs), batch.query_y, torch.stack(losses))

    def uses_autograd_loop(self) -> bool:
        """Whether ``batch_gradient``'s per-task loop runs with ordinary autograd
        (``autograd_batch_gradient``): for learners whose contribution is the gradient of
        ``query_loss`` (the default ``task_gradient``) or that say how to compute theirs
        (``autograd_task_gradient``)."""
        cls = type(self)
        return (cls.task_gradient is Learner.task_gradient
                or cls.autograd_task_gradient is not Learner.autograd_task_gradient)

    def autograd_batch_gradient(self, params: Params, batch: TaskBatch, *,
                                ways: int | None) -> tuple[Params, dict[str, float]]:
        """The per-task loop of ``batch_gradient`` run with ordinary autograd, as a hand-written
        training loop does: one ``backward`` per task into leaf weights, inner gradients by
        ``torch.autograd.grad`` (``functional.plain_autograd``), image batches channels-last.
        The same sum as ``task_gradient``'s torch.func path, to float rounding (the contract
        tests compare them); on CPU it runs 1.5-2x faster (benchmarks/throughput.py): torch.func's
        nested transform costs more than a plain graph there, and oneDNN pools and convolves
        channels-last maps several times faster than NCHW ones."""
        # Convolution weights channels-last too, as the batches: oneDNN would otherwise convert
        # each weight (and the gradient it computes back) at every call.
        layout = channels_last if self.channels_last_images else (lambda v: v)
        leaves = {k: layout(v.detach()).requires_grad_() for k, v in params.items()}
        losses, outputs = [], []
        extra: Params = {}
        with torch.enable_grad(), plain_autograd():
            for i in range(len(batch)):
                task = batch[i]
                if self.channels_last_images:
                    task = Task(channels_last(task.support_x), task.support_y,
                                channels_last(task.query_x), task.query_y)
                loss, output, more = self.autograd_task_gradient(leaves, task, ways=ways)
                for name, value in more.items():
                    extra[name] = extra[name] + value if name in extra else value
                losses.append(loss)
                outputs.append(output)
        total = {k: torch.zeros_like(v) if v.grad is None else v.grad for k, v in leaves.items()}
        for name, value in extra.items():
            total[name] = total[name] + value
        return total, self.summed_statistics(torch.stack(outputs), batch.query_y,
                                             torch.stack(losses))

    def autograd_task_gradient(self, leaves: Params, task: Task, *,
                               ways: int | None = None) -> tuple[Tensor, Tensor, Params]:
        """``task_gradient`` for the autograd loop: accumulate this task's gradient into the
        leaves' ``.grad`` with ``backward()``; return the detached query loss and outputs, and
        any contribution that is not a loss gradient (iMAML's meta-gradient), to be added."""
        loss, outputs = self.query_loss(leaves, task, ways=ways)
        loss.backward()
        return loss.detach(), outputs.detach(), {}

    def ways_of(self, support_y: Tensor, ways: int | None = None) -> int | None:
        """``ways`` if given, else the number of classes the support labels hold (every task of
        a batch has the same); None for regression."""
        if ways is not None or not self.objective.classification:
            return ways
        return task_ways(support_y)

    def adapted_outputs(self, params: Params, support_x: Tensor, support_y: Tensor,
                        query_x: Tensor, *, ways: int | None = None,
                        steps: int | None = None) -> Tensor:
        """Outputs for ``query_x`` after adapting to the support set: the one path evaluation,
        ``orch predict`` and serving share. Works under ``torch.no_grad``: torch.func's inner
        gradients ignore an outer no_grad. Refuses more classes than the learner can serve."""
        return self.adapted_prediction(params, support_x, support_y, query_x, ways=ways,
                                       steps=steps)[0]

    def adapted_prediction(self, params: Params, support_x: Tensor, support_y: Tensor,
                           query_x: Tensor, *, ways: int | None = None,
                           steps: int | None = None) -> tuple[Tensor, Tensor | None]:
        """``adapted_outputs`` and the predictive standard deviation beside them (None for
        learners without uncertainty, see ``predict_distribution``)."""
        ways = self.ways_of(support_y, ways)
        if ways is not None:
            self.check_ways(params, ways)
        adapted = self.adapt(params, support_x, support_y, ways=ways, steps=steps)
        distribution = self.predict_distribution(params, adapted, query_x)
        if distribution is not None:
            return distribution
        return self.predict(params, adapted, query_x), None

    def batch_evaluate(self, params: Params, batch: TaskBatch, *, steps: int | None = None,
                       vectorize: bool = False) -> dict[str, float]:
        """Summed query statistics after adapting to each task of the batch."""
        params = {k: v.detach() for k, v in params.items()}
        ways = self.ways_of(batch.support_y)

        def outputs_for(sx: Tensor, sy: Tensor, qx: Tensor) -> Tensor:
            return self.adapted_outputs(params, sx, sy, qx, ways=ways, steps=steps)

        with torch.no_grad():
            if vectorize:
                outputs = vmap(outputs_for)(batch.support_x, batch.support_y, batch.query_x)
            else:
                outputs = torch.stack([outputs_for(batch.support_x[i], batch.support_y[i],
                                                   batch.query_x[i]) for i in range(len(batch))])
            losses = torch.stack([self.objective.loss(outputs[i], batch.query_y[i])
                                  for i in range(len(batch))])
        return self.summed_statistics(outputs, batch.query_y, losses)

    def summed_statistics(self, outputs: Tensor, targets: Tensor, losses: Tensor) -> dict[str, float]:
        """Per-task statistics summed over the leading (task) dimension."""
        stats = {"loss": float(losses.sum())}
        if self.objective.classification:
            correct = (outputs.argmax(dim=-1) == targets).float().mean(dim=-1)
            stats["accuracy"] = float(correct.sum())
        return stats


def channels_last(x: Tensor) -> Tensor:
    """Image batches and convolution weights ([N, C, H, W]) in channels-last memory order, which
    oneDNN's CPU convolutions and pooling run faster on (benchmarks/throughput.py); other
    tensors as they are."""
    if x.dim() != 4 or x.device.type != "cpu":
        return x
    if x.shape[1] == 1:
        # One channel: both orders have the same memory, but torch reads the default strides as
        # NCHW and convolutions would answer in NCHW; a channel stride of 1 says channels-last.
        height, width = x.shape[-2:]
        return x.contiguous().as_strided(x.shape, (height * width, 1, width, 1))
    return x.contiguous(memory_format=torch.channels_last)
