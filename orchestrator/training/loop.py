"""The meta-training loop: plain PyTorch, no Ray, MLflow or Optuna.

A trial is: build the task family and learner from the sweep, then for each iteration ask a
``Farm`` for the meta-batch's summed task gradients, divide by the task count, and step the outer
optimiser; every ``eval_every`` iterations ask the farm for validation statistics and hand them to
a callback (which logs, reports to the pruner, and may stop the trial). Where the farm computes --
in this process or on Ray actors -- is invisible here, which is what makes the 2-worker meta-
gradient equal the in-process one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
from torch import Tensor

from learners.base import Params
from learners.transduction import Transduction, transductive_statistics
from orchestrator.config import OUTER_KNOBS, SinusoidData, Sweep
from orchestrator.training.factory import build_family, build_learner, split_names, task_shape
from orchestrator.training.initial import transplant
from pipelines.base import TaskFamily, TaskList


class TrialDiverged(RuntimeError):
    """The meta-training loss became NaN or infinite; the trial cannot continue."""


def pick_device(preference: str = "auto", gpu_ids: Sequence[int] = ()) -> torch.device:
    """CPU, or the GPU a scheduler assigned (``CUDA_VISIBLE_DEVICES`` is set by Ray, so the
    assigned GPU is always index 0 of what this process sees)."""
    if preference == "cpu" or not torch.cuda.is_available():
        if preference == "cuda":
            raise RuntimeError("training.device is 'cuda' but no CUDA device is visible to this process")
        return torch.device("cpu")
    return torch.device("cuda", 0)


class ShardWorker:
    """Computes summed task gradients and validation statistics for a shard of task indices.

    Built from plain data (the sweep as a dict, the algorithm, the resolved knobs) so that a Ray
    actor can construct an identical one anywhere; it samples its own tasks from (split, seed,
    index) so only integers and the current weights travel. Tasks of different shapes
    (variable-way episodes, a ``TaskList``) are adapted to one at a time and summed; knobs that
    name a transductive method (``transductive``) make validation classify each task's queries
    together with it.
    """

    def __init__(self, sweep: dict[str, Any], algorithm: str, knobs: Mapping[str, Any], *,
                 device: str = "cpu"):
        self.sweep = Sweep.model_validate(sweep)
        self.family = build_family(self.sweep.data)
        training = self.sweep.training
        self.learner = build_learner(self.sweep.model, algorithm, knobs, **task_shape(self.family),
                                     classes=training_classes(self.family, self.sweep),
                                     inner_checkpointing=training.inner_checkpointing)
        self.device = torch.device(device)
        self.learner.backbone.to(self.device)
        self.vectorize = should_vectorize(training.vectorize, self.sweep.model.backbone,
                                          self.device,
                                          recompute=training.inner_checkpointing is not None)
        # Validation by a transductive method, where the knobs ask for one (``transductive``).
        self.transduction = Transduction.from_knobs(knobs)

    def sample(self, split: str, seed: int, indices: Sequence[int]) -> Any:
        """The shard's tasks (or, for pretraining learners, labelled minibatch shards), on the
        CPU; the same for the same (split, seed, indices)."""
        return self.learner.training_batch(self.family, split, seed, indices)

    def gradient(self, params: Params, split: str, seed: int, indices: Sequence[int], *,
                 progress: float = 0.0, batch: Any = None) -> tuple[Params, dict[str, float], int]:
        """Sum over the shard of each task's outer-update contribution, and summed statistics.
        ``progress`` is the fraction of meta-training done (for learners that anneal);
        ``batch``, where given, is ``sample(split, seed, indices)`` done earlier."""
        batch = (self.sample(split, seed, indices) if batch is None else batch).to(self.device)
        params = self._on_device(params)
        if isinstance(batch, TaskList):  # tasks of different shapes: one at a time, summed
            total, stats = _summed([self.learner.batch_gradient(
                params, one, vectorize=self.vectorize, progress=progress)
                for one in batch.singles()])
        else:
            total, stats = self.learner.batch_gradient(params, batch, vectorize=self.vectorize,
                                                       progress=progress)
        return {k: v.cpu() for k, v in total.items()}, stats, len(indices)

    def evaluate(self, params: Params, split: str, seed: int, indices: Sequence[int], *,
                 shots: int | None = None, steps: int | None = None) -> tuple[dict[str, float], int]:
        """Summed query statistics after adaptation, over the shard's validation tasks."""
        batch = self.family.batch(split, seed, indices, shots=shots).to(self.device)
        params = self._on_device(params)
        if self.transduction is not None:
            stats = transductive_statistics(self.learner, params, batch, self.transduction)
        elif isinstance(batch, TaskList):
            stats = _summed([({}, self.learner.batch_evaluate(
                params, one, steps=steps, vectorize=self.vectorize))
                for one in batch.singles()])[1]
        else:
            stats = self.learner.batch_evaluate(params, batch, steps=steps,
                                                vectorize=self.vectorize)
        return stats, len(indices)

    def _on_device(self, params: Params) -> Params:
        return {k: v.to(self.device) for k, v in params.items()}


def _summed(parts: Sequence[tuple[Params, dict[str, float]]]) -> tuple[Params, dict[str, float]]:
    """Gradients and statistics of several batches, added up."""
    total: Params = {}
    stats: dict[str, float] = {}
    for gradient, part in parts:
        for name, g in gradient.items():
            total[name] = total[name] + g if name in total else g
        for key, value in part.items():
            stats[key] = stats.get(key, 0.0) + value
    return total, stats


def training_classes(family: TaskFamily, sweep: Sweep) -> int | None:
    """The number of classes of the training split, which pretraining learners classify over."""
    return family.class_count(split_names(sweep.data)[0])


def should_vectorize(setting: str, backbone: str, device: torch.device, *,
                     recompute: bool = False) -> bool:
    """``training.vectorize``: "auto" maps tasks with vmap for the MLP and on GPUs, but not
    where the inner loop is recomputed (``recompute``: ``training.inner_checkpointing``, which
    runs in the per-task autograd loop; the sweep file refuses it with "on")."""
    if setting != "auto":
        return setting == "on"
    return not recompute and (backbone == "mlp" or device.type == "cuda")


class Farm(Protocol):
    """Where a meta-batch is computed: ``LocalFarm`` here, ``cluster.RayFarm`` on Ray actors."""

    def gradient(self, params: Params, split: str, seed: int, indices: Sequence[int], *,
                 progress: float = 0.0) -> tuple[Params, dict[str, float], int]: ...

    def evaluate(self, params: Params, split: str, seed: int, indices: Sequence[int], *,
                 shots: int | None = None, steps: int | None = None) -> tuple[dict[str, float], int]: ...

    def node_ids(self) -> list[str]: ...


class LocalFarm:
    """The in-process farm (``workers.count: 0``): the same ``ShardWorker``, no Ray."""

    def __init__(self, worker: ShardWorker, node_id: str = "local"):
        self.worker = worker
        self._node_id = node_id

    def gradient(self, params, split, seed, indices, *, progress=0.0):
        return self.worker.gradient(params, split, seed, indices, progress=progress)

    def evaluate(self, params, split, seed, indices, *, shots=None, steps=None):
        return self.worker.evaluate(params, split, seed, indices, shots=shots, steps=steps)

    def node_ids(self) -> list[str]:
        return [self._node_id]


@dataclass
class Validation:
    """The metrics of one validation during meta-training, after ``iteration`` iterations."""

    iteration: int
    metrics: dict[str, float]


@dataclass
class TrialOutcome:
    params: Params
    evaluations: list[Validation] = field(default_factory=list)
    stopped_early: bool = False
    tasks_per_second: float = 0.0

    @property
    def final(self) -> dict[str, float]:
        return self.evaluations[-1].metrics if self.evaluations else {}


@dataclass
class LoopState:
    """Everything the outer loop carries from one iteration to the next, after ``iteration``
    iterations: resuming from it continues exactly where the loop was (the learners' schedules
    -- MAML++'s cosine rate, loss weights and first- to second-order switch -- are functions of
    the iteration, and tasks are sampled from (split, seed, index), so nothing else is needed).
    ``optimizer`` None starts a fresh outer optimiser; ``extra`` is the caller's own record
    (curves, what it reported), saved and restored with the loop."""

    iteration: int
    params: Params
    optimizer: dict[str, Any] | None = None
    evaluations: list[Validation] = field(default_factory=list)
    rng: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Checkpointer(Protocol):
    """Where and how often the loop saves its state (``checkpoints.TrialCheckpointer``)."""

    def due(self, iterations_done: int, *, last: bool) -> bool: ...

    def save(self, state: LoopState, *, last: bool = False) -> None: ...


# Called after each validation with (iteration, metrics); returning True stops the trial (pruning).
EvalCallback = Callable[[int, dict[str, float]], bool]


class MetaTrainer:
    """Runs the outer loop of one trial over a farm."""

    def __init__(self, sweep: Sweep, algorithm: str, knobs: Mapping[str, Any], farm: Farm, *,
                 seed: int | None = None, init: Params | None = None):
        self.sweep = sweep
        self.algorithm = algorithm
        self.knobs = dict(knobs)
        self.farm = farm
        self.seed = sweep.training.seed if seed is None else seed
        self.train_split, self.val_split = split_names(sweep.data)
        family = build_family(sweep.data)
        self.learner = build_learner(sweep.model, algorithm, knobs, **task_shape(family),
                                     classes=training_classes(family, sweep))
        self.meta_batch = int(self.knobs.get("meta_batch") or sweep.training.meta_batch)
        # The backbone weights of ``model.init``'s model (``pretrained.Init.weights``), or None.
        self.init = init

    def initial_params(self) -> Params:
        """The learner's fresh meta-parameters; with ``init``, their backbone entries are the
        pretrained model's (``pretrained.transplant``: heads and the learner's own state stay
        fresh)."""
        params = self.learner.init_params(self.seed)
        return params if self.init is None else transplant(self.learner, params, self.init)

    def meta_gradient(self, params: Params, iteration: int, *,
                      progress: float = 0.0) -> tuple[Params, dict[str, float]]:
        """The mean outer-update direction of iteration ``iteration``'s meta-batch."""
        start = iteration * self.meta_batch
        total, stats, count = self.farm.gradient(params, self.train_split, self.seed,
                                                 range(start, start + self.meta_batch),
                                                 progress=progress)
        return ({k: v / count for k, v in total.items()},
                {f"train_{k}": v / count for k, v in stats.items()})

    def validate(self, params: Params, *, shots: int | None = None,
                 steps: int | None = None, tasks: int | None = None) -> dict[str, float]:
        count = tasks or self.sweep.training.eval_tasks
        if shots is None and isinstance(self.sweep.data, SinusoidData):
            shots = self.sweep.data.eval_shots
        stats, n = self.farm.evaluate(params, self.val_split, self.seed, range(count),
                                      shots=shots, steps=steps)
        return {f"val_{k}": v / n for k, v in stats.items()}

    def train(self, on_eval: EvalCallback | None = None, *,
              on_iteration: Callable[[int, dict[str, float]], None] | None = None,
              resume: LoopState | None = None, checkpointer: Checkpointer | None = None,
              extra_state: Callable[[], dict[str, Any]] | None = None,
              time_budget_s: float | None = None) -> TrialOutcome:
        """Meta-train to ``training.iterations`` -- from ``resume`` where given, else from the
        learner's initial weights -- or until this process has used ``time_budget_s`` seconds of
        CPU time (then the iteration in progress is the last one and is validated). CPU time, not
        wall time, so that benchmarks give every learner the same compute however busy the
        machine is. Whenever ``checkpointer`` says so, the loop's state (with ``extra_state()``)
        is handed to it, after that iteration's validation."""
        training = self.sweep.training
        start = resume or LoopState(0, self.initial_params())
        params = {k: v.clone().requires_grad_(True) for k, v in start.params.items()}
        statistics = {k for k in params if self.learner.is_statistic(k)}
        optimizer = self._outer_optimizer([p for k, p in params.items() if k not in statistics])
        base_lr = optimizer.param_groups[0]["lr"]
        if start.optimizer is not None:
            optimizer.load_state_dict(start.optimizer)
        if start.rng is not None:
            torch.set_rng_state(start.rng)
        outcome = TrialOutcome(params=params, evaluations=list(start.evaluations))
        started, cpu_started, tasks = time.perf_counter(), time.process_time(), 0
        for iteration in range(start.iteration, training.iterations):
            # The fraction of training done, by iterations or by the time budget, whichever is
            # further: learners that anneal (MAML++) and the cosine outer schedule read it.
            progress = iteration / training.iterations
            if time_budget_s is not None:
                progress = max(progress, (time.process_time() - cpu_started) / time_budget_s)
            progress = min(progress, 1.0)
            if self.learner.outer_schedule == "cosine":
                optimizer.param_groups[0]["lr"] = cosine(base_lr, progress)
            gradient, stats = self.meta_gradient(_detached(params), iteration, progress=progress)
            if not all(math.isfinite(v) for v in stats.values()):
                raise TrialDiverged(f"meta-training loss became {stats.get('train_loss')} at "
                                    f"iteration {iteration}")
            optimizer.zero_grad(set_to_none=True)
            for name, p in params.items():
                p.grad = gradient[name].to(p.device)
            optimizer.step()
            with torch.no_grad():
                for name in statistics:  # a moving average, not a loss gradient
                    params[name] -= self.learner.statistics_momentum * params[name].grad
            tasks += self.meta_batch
            if on_iteration is not None:
                on_iteration(iteration, stats)
            out_of_time = (time_budget_s is not None
                           and time.process_time() - cpu_started >= time_budget_s)
            last = iteration + 1 == training.iterations or out_of_time
            if (iteration + 1) % training.eval_every == 0 or last:
                metrics = {**stats, **self.validate(_detached(params))}
                if not all(math.isfinite(v) for v in metrics.values()):
                    raise TrialDiverged(f"validation loss became {metrics.get('val_loss')} at "
                                        f"iteration {iteration}")
                outcome.evaluations.append(Validation(iteration + 1, metrics))
                if on_eval is not None and on_eval(iteration + 1, metrics) and not last:
                    outcome.stopped_early = True
                    break
            if checkpointer is not None and checkpointer.due(iteration + 1, last=last):
                checkpointer.save(LoopState(
                    iteration + 1, _detached(params), optimizer.state_dict(),
                    list(outcome.evaluations), torch.get_rng_state(),
                    extra_state() if extra_state is not None else {}), last=last)
            if out_of_time:
                break
        outcome.tasks_per_second = tasks / max(time.perf_counter() - started, 1e-9)
        outcome.params = _detached(params)
        return outcome

    def _outer_optimizer(self, tensors: list[Tensor]) -> torch.optim.Optimizer:
        lr = float(self.knobs.get("outer_lr", OUTER_KNOBS["outer_lr"]))
        if self.sweep.training.outer_optimizer == "sgd":
            return torch.optim.SGD(tensors, lr=lr)
        return torch.optim.Adam(tensors, lr=lr)


def cosine(base_lr: float, progress: float, *, floor: float = 0.0) -> float:
    """Cosine annealing of the outer rate from ``base_lr`` at progress 0 to ``floor`` at 1."""
    return floor + 0.5 * (base_lr - floor) * (1 + math.cos(math.pi * progress))


def _detached(params: Mapping[str, Tensor]) -> Params:
    return {k: v.detach() for k, v in params.items()}
