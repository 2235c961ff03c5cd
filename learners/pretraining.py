"""What the pretrain-then-adapt learners share: a backbone trained as an ordinary classifier over
every class of the training split, and a new head fitted to each task's frozen support features.

Chen et al. (2019, "A Closer Look at Few-shot Classification") and Wang et al. (2019, SimpleShot)
showed that such a backbone, with no meta-learning at all, is as good a few-shot learner as most
meta-learners. Here the meta-parameters are the backbone's weights and a classifier over the
``classes`` of the training split (each rotation of a class a class of its own, where the data
rotates), under ``classifier.``. A training iteration is ``meta_batch`` minibatch shards of
``batch_size`` labelled images (``Learner.training_batch``: ``TaskFamily.minibatches``), farmed
over the trial's workers exactly as a meta-batch's tasks are; ``batch_gradient`` returns the sum
of each shard's mean cross-entropy gradient, so the trainer's division by the shard count makes
it the mean over the iteration's images, on any number of workers. BatchNorm normalises over a
shard, as over a task. Validation, model selection and serving stay episodic (``adapt``,
``predict``), so these learners are compared with the meta-learners on the same episodes.

``fit_head`` is the adaptation of Baseline and Baseline++, after the authors' code
(wyharveychen/CloserLookFewShot, ``methods/baselinefinetune.py``): a new head, initialised as
``nn.Linear`` initialises its weights, trained on the support features by SGD with rate 0.01,
momentum 0.9, dampening 0.9 and weight decay 0.001, for 100 passes over the support set in
batches of 4 (in a shuffled order; 200 steps for a 5-way 1-shot task). Rate, passes and batch
are knobs; ``finetune`` trains the backbone with the head, on the same batches.
"""

from __future__ import annotations

import abc
from typing import Sequence

import numpy as np
import torch
from pydantic import Field
from torch import Tensor
from torch.func import grad, vmap

from learners.backbones import call
from learners.base import Adapted, Hyperparameters, Learner, Params, channels_last
from learners.functional import entries, fresh_params, one_hot, without
from pipelines.base import Minibatches, Task, TaskFamily

CLASSIFIER = "classifier."
# The head fitted at adaptation: SGD with the authors' momentum, dampening and weight decay.
MOMENTUM, DAMPENING, WEIGHT_DECAY = 0.9, 0.9, 1e-3


class PretrainHyperparameters(Hyperparameters):
    batch_size: int = Field(16, ge=1, le=4096, description="images per minibatch shard (Chen "
                            "et al.: 16); an iteration averages meta_batch shards, so it sees "
                            "meta_batch x batch_size images, each shard normalised on its own")


class FitHeadHyperparameters(PretrainHyperparameters):
    adapt_lr: float = Field(0.01, gt=0, description="SGD rate of the head fitted to a task")
    adapt_epochs: int = Field(100, ge=1, le=1000,
                              description="passes over the support set when fitting the head")
    adapt_batch: int = Field(4, ge=1, description="support examples per SGD step of the fit")
    finetune: bool = Field(False, description="fine-tune the backbone with the head on the "
                           "support set (Chen et al. keep it frozen)")


class Pretrained(Learner):
    """A backbone and a classifier over every training class, trained on labelled minibatches."""

    family = "pretrained"
    needs_head = False
    task_kinds = ("classification",)
    embeds = True
    Hyperparameters = PretrainHyperparameters
    # Chen et al. train with Adam at its default rate, 0.001.
    search_space = {"outer_lr": {"low": 0.0003, "high": 0.003, "log": True}}
    # Meta-parameter entries that are not the backbone's (besides the classifier).
    extra_entries: tuple[str, ...] = ()

    # -- what each learner says ---------------------------------------------------------------

    @abc.abstractmethod
    def new_head(self, rows: int, features: int, generator: np.random.Generator) -> Params:
        """A freshly initialised head of ``rows`` classes over ``features`` inputs."""

    @abc.abstractmethod
    def head_gradient(self, params: Params, head: Params, features: Tensor,
                      labels: Tensor) -> Params:
        """The gradient with respect to ``head`` of the mean cross-entropy of its logits for
        ``features``, in closed form (what ``fit_head`` steps on)."""

    @abc.abstractmethod
    def head_logits(self, params: Params, head: Params, features: Tensor) -> Tensor:
        """The logits of ``head`` (a dict as ``new_head`` makes) for ``[n, features]`` inputs;
        ``params`` are the meta-parameters (Baseline++'s learned scale)."""

    def shard_statistics(self, params: Params, features: Tensor) -> Params:
        """For each running statistic among the meta-parameters (``is_statistic``), its value
        minus this shard's (the trainer moves it toward the shards' mean); none by default."""
        return {}

    # -- the interface -------------------------------------------------------------------------

    def initial_params(self, generator: torch.Generator) -> Params:
        if self.classes is None:
            raise ValueError(f"{self.name} pretrains a classifier over the training split's "
                             "classes; build it with their number (build_learner's classes)")
        body = fresh_params(self.backbone, generator)
        # The head from a NumPy stream started from the same seed, as ``new_head`` draws heads.
        head = self.new_head(self.classes, self.backbone.feature_size,
                             np.random.default_rng(generator.initial_seed()))
        return {**body, **{CLASSIFIER + k: v for k, v in head.items()}}

    def body(self, params: Params) -> Params:
        """The backbone's entries of ``params``."""
        return without(params, CLASSIFIER, *self.extra_entries)

    def embed(self, params: Params, x: Tensor) -> Tensor:
        return call(self.backbone, self.body(params), x).flatten(start_dim=1)

    def embedding(self, params: Params, x: Tensor) -> Tensor:
        return self.embed(params, x)

    def servable_ways(self, params: Params) -> int | None:
        return None  # every task gets a head (or class means) of its own

    def training_batch(self, family: TaskFamily, split: str, seed: int,
                       indices: Sequence[int]) -> Minibatches:
        return family.minibatches(split, seed, indices, size=self.hparams.batch_size)

    def task_gradient(self, params: Params, task: Task, *,
                      ways: int | None = None) -> tuple[Params, Tensor, Tensor]:
        raise TypeError(f"{self.name} is not trained on episodes: its training batches are "
                        "labelled minibatches (training_batch, batch_gradient)")

    def shard_loss(self, params: Params, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A shard's mean cross-entropy over the training classes, its logits and features."""
        features = self.embed(params, x)
        logits = self.head_logits(params, entries(params, CLASSIFIER), features)
        return torch.nn.functional.cross_entropy(logits, y), logits, features

    def batch_gradient(self, params: Params, batch: Minibatches, *, vectorize: bool = False,
                       progress: float | None = None) -> tuple[Params, dict[str, float]]:
        """The sum over shards of each shard's mean cross-entropy gradient (statistics: their
        value minus the shard's), and summed statistics. ``vectorize`` maps the shards with
        ``torch.func.vmap``; otherwise each shard runs with ordinary autograd, channels-last
        (faster on CPU, as ``Learner.autograd_batch_gradient``). Both give the same sums."""
        params = {k: v.detach() for k, v in params.items()}
        if vectorize:
            def one(x: Tensor, y: Tensor) -> tuple[Params, Tensor, Tensor]:
                def loss_of(p: Params) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
                    loss, logits, features = self.shard_loss(p, x, y)
                    return loss, (loss.detach(), logits.detach(), features.detach())

                gradient, (loss, logits, features) = grad(loss_of, has_aux=True)(params)
                return {**gradient, **self.shard_statistics(params, features)}, loss, logits

            gradients, losses, logits = vmap(one)(batch.x, batch.y)
            total = {k: g.sum(dim=0) for k, g in gradients.items()}
            return total, self.summed_statistics(logits, batch.y, losses)
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        statistics: Params = {}
        losses, outputs = [], []
        with torch.enable_grad():
            for x, y in zip(batch.x, batch.y):
                loss, logits, features = self.shard_loss(leaves, channels_last(x), y)
                loss.backward()
                for name, value in self.shard_statistics(params, features.detach()).items():
                    statistics[name] = statistics[name] + value if name in statistics else value
                losses.append(loss.detach())
                outputs.append(logits.detach())
        total = {k: torch.zeros_like(v) if v.grad is None else v.grad for k, v in leaves.items()}
        total.update(statistics)
        return total, self.summed_statistics(torch.stack(outputs), batch.y, torch.stack(losses))


class FitsHead(Pretrained):
    """Adapts by fitting a new head (of the pretraining head's kind) to the support features."""

    Hyperparameters = FitHeadHyperparameters

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor, *,
              ways: int | None = None, steps: int | None = None) -> Adapted:
        return fit_head(self, params, support_x, support_y, ways=self.ways_of(support_y, ways))

    def adaptation_steps(self, support_size: int, steps: int | None = None) -> int:
        """The SGD steps of ``fit_head``: ``adapt_epochs`` passes of ``adapt_batch`` examples."""
        h = self.hparams
        return h.adapt_epochs * -(-support_size // h.adapt_batch)

    def predict(self, params: Params, adapted: Adapted, query_x: Tensor) -> Tensor:
        body = {k: adapted.get(k, v) for k, v in self.body(params).items()}
        features = call(self.backbone, body, query_x).flatten(start_dim=1)
        return self.head_logits(params, entries(adapted, "head."), features)


def fit_head(learner: FitsHead, params: Params, support_x: Tensor, support_y: Tensor, *,
             ways: int) -> Adapted:
    """A new ``ways``-class head trained on the support set as the module docstring says, under
    ``head.``, with the fine-tuned backbone entries beside it when ``finetune``. Deterministic
    (its initial head and the order of the support set are drawn from a fixed seed) and free
    of random ops and value reads, so it runs under ``vmap``. A frozen backbone's head takes
    its gradients in closed form (``head_gradient``: about 10x faster than ``torch.func.grad``
    on CPU, where each of the hundreds of steps is a few tiny products); fine-tuning takes them
    with ``torch.func.grad``, which also works under ``torch.no_grad``."""
    h = learner.hparams
    generator = np.random.default_rng(0)
    frozen = learner.body(params)
    features = None if h.finetune else learner.embed(params, support_x).detach()
    like = support_x if features is None else features
    head = learner.new_head(ways, learner.backbone.feature_size, generator)
    weights = {"head." + k: v.to(device=like.device, dtype=like.dtype) for k, v in head.items()}
    if h.finetune:
        weights.update({k: v.detach() for k, v in frozen.items()})

    def finetune_loss(w: Params, rows: Tensor) -> Tensor:
        embedded = call(learner.backbone, {**frozen, **without(w, "head.")},
                        support_x[rows]).flatten(start_dim=1)
        return torch.nn.functional.cross_entropy(
            learner.head_logits(params, entries(w, "head."), embedded), support_y[rows])

    def gradient(w: Params, rows: Tensor) -> Params:
        if features is None:
            return grad(finetune_loss)(w, rows)
        fitted = learner.head_gradient(params, entries(w, "head."), features[rows],
                                       support_y[rows])
        return {"head." + k: g for k, g in fitted.items()}

    momentum: Params | None = None
    size = support_x.shape[0]
    for _ in range(h.adapt_epochs):
        order = torch.as_tensor(generator.permutation(size), device=support_x.device)
        for start in range(0, size, h.adapt_batch):
            rows = order[start:start + h.adapt_batch]
            # torch.optim.SGD's update: the buffer starts as the first gradient, undampened.
            step = {k: g + WEIGHT_DECAY * weights[k] for k, g in gradient(weights, rows).items()}
            momentum = step if momentum is None else {
                k: MOMENTUM * momentum[k] + (1 - DAMPENING) * step[k] for k in step}
            weights = {k: weights[k] - h.adapt_lr * momentum[k] for k in weights}
    return {k: v.detach() for k, v in weights.items()}


def logit_error(logits: Tensor, labels: Tensor) -> Tensor:
    """The gradient of the mean cross-entropy with respect to the logits: (softmax - one-hot) / n.
    The one-hot by comparison, so it runs under ``vmap``."""
    targets = one_hot(labels, logits.shape[-1]).to(logits.dtype)
    return (torch.softmax(logits, dim=-1) - targets) / logits.shape[0]


def linear_init(rows: int, features: int, generator: np.random.Generator, *,
                bias: bool) -> Params:
    """``nn.Linear``'s initial weights (and bias), uniform in +-1/sqrt(features), drawn from
    ``generator`` (NumPy, so that no torch random op runs inside ``vmap``)."""
    bound = 1 / np.sqrt(features)
    head = {"weight": torch.from_numpy(
        generator.uniform(-bound, bound, (rows, features)).astype(np.float32))}
    if bias:
        head["bias"] = torch.from_numpy(generator.uniform(-bound, bound, rows).astype(np.float32))
    return head


class LinearHead:
    """A linear classifier, for the learners that pretrain one (Baseline, SimpleShot): initialised
    as ``nn.Linear``, the pretraining classifier's bias zeroed as in the authors' BaselineTrain."""

    def initial_params(self, generator: torch.Generator) -> Params:
        params = super().initial_params(generator)  # type: ignore[misc]
        params[CLASSIFIER + "bias"].zero_()
        return params

    def new_head(self, rows: int, features: int, generator: np.random.Generator) -> Params:
        return linear_init(rows, features, generator, bias=True)

    def head_logits(self, params: Params, head: Params, features: Tensor) -> Tensor:
        return features @ head["weight"].transpose(0, 1) + head["bias"]

    def head_gradient(self, params: Params, head: Params, features: Tensor,
                      labels: Tensor) -> Params:
        error = logit_error(self.head_logits(params, head, features), labels)
        return {"weight": error.transpose(0, 1) @ features, "bias": error.sum(dim=0)}
