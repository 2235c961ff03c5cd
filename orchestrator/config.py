"""The sweep file: one typed model, validated from YAML with a safe loader.

Every section is a pydantic model that forbids unknown keys, so a typo fails at load time with the
file, the key path and what is allowed -- never after hours of compute. ``load_sweep`` is the only
way a sweep file is read.

    name: quickstart                  # experiment name in MLflow, prefix of the Optuna studies
    data: {family: sinusoid, shots: 10, queries: 10}
    model: {backbone: mlp, hidden: [40, 40]}
    training: {meta_batch: 25, iterations: 300, eval_every: 50}
    workers: {count: 2, cpus: 0.5, gpus: 0}
    search: {trials: 4, parallel: 1, metric: val_loss}   # minimised: the direction follows
    algorithms:
      maml: {inner_lr: {low: 0.001, high: 0.1, log: true}, inner_steps: 1, outer_lr: 0.001}
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError,
                      field_validator, model_validator)

from learners.backbones import BACKBONES
from learners.registry import LEARNERS, learner_class
from learners.transduction import (METHOD_KNOB, METHODS, NONE, TransductionError, check_learner,
                                   method_knobs)
from orchestrator.errors import UserError

DEFAULT_RUN_DIR = "orch-runs"
DEFAULT_TRACKING_URI = f"sqlite:///{DEFAULT_RUN_DIR}/mlflow.db"
DEFAULT_STORAGE = f"sqlite:///{DEFAULT_RUN_DIR}/optuna.db"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# What names a trained model, in model.init here and in orch predict, evaluate and compare.
URI_FORMS = "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a model folder"


class ConfigError(UserError):
    """A sweep file (or a value derived from one) that orch cannot run; the message is one line."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Tracking(Section):
    uri: str | None = Field(None, description=(
        "MLflow tracking URI; null: sqlite:///<run_dir>/mlflow.db (--tracking-uri and "
        "MLFLOW_TRACKING_URI win); on a cluster of several hosts a tracking server"))
    registry_prefix: str = Field("orch-", description=(
        "registered models are named <prefix><algorithm>, e.g. orch-maml"))


class RaySection(Section):
    address: str | None = Field(None, description=(
        "null: Ray in this process; auto, HOST:6379 or ray://HOST:10001: a cluster "
        "(--address wins)"))
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how a trial's placement group is laid over nodes: PACK fills a node "
        "first, SPREAD spreads its shard workers")


class SinusoidData(Section):
    family: Literal["sinusoid"] = Field("sinusoid", description=(
        "sinusoid regression (the MAML paper's), drawn on the fly"))
    shots: int = Field(10, ge=1, description="K support points per task")
    queries: int = Field(10, ge=1, description="query points per task")
    eval_shots: int | None = Field(None, ge=1, description="K at validation; default: shots")


class ImageData(Section):
    family: Literal["images"] = Field("images", description=(
        "few-shot images from an import (implied by path)"))
    path: str | list[str] = Field(description=(
        "the folder `orch data import` wrote, or a pyarrow.fs URI of a copy (s3://, gs://, "
        "hdfs://, file://); a list of them: each episode from one (multi-source)"))
    weights: list[float] | None = Field(None, description=(
        "with a list of imports: each one's share of the meta-training episodes (relative, one "
        "per import); null: source_sampling decides"))
    ways: int = Field(5, ge=2, description="N: classes per episode (fixed episodes)")
    shots: int = Field(1, ge=1, description="K: support images per class (fixed episodes)")
    queries: int = Field(15, ge=1, description="query images per class (fixed episodes)")
    image_size: int | None = Field(None, ge=4, description=(
        "side of the square images the backbone reads; must be the size the import stored; "
        "null: that size"))
    train_split: str = Field("train", description="the import's split that meta-trains")
    val_split: str = Field("val", description=(
        "the split that validates: pruning and the best trial go by it"))
    augment_rotations: bool = Field(False, description=(
        "rotations by 90, 180 and 270 degrees as new classes (the Omniglot convention)"))
    episodes: Literal["fixed", "variable"] = Field("fixed", description=(
        "fixed: ways x shots support and ways x queries query images; variable: Meta-Dataset's "
        "episodes (5 to 50 ways, imbalanced shots, balanced queries), in place of ways, shots "
        "and queries"))
    source_sampling: Literal["uniform", "classes"] = Field("uniform", description=(
        "with a list of imports: uniform (each import equally often, as Meta-Dataset) or "
        "classes (by its training classes)"))

    @field_validator("path")
    @classmethod
    def _imports(cls, value: str | list[str]) -> str | list[str]:
        paths = [value] if isinstance(value, str) else value
        if any(not path.strip() for path in paths):
            raise ValueError("an import's path is empty")
        if isinstance(value, list):
            if len(value) < 2:
                raise ValueError("a list names 2 or more imports (multi-source); give one "
                                 "import as its path alone")
            twice = sorted({path for path in value if value.count(path) > 1})
            if twice:
                raise ValueError(f"{twice[0]} is named twice")
        return value

    @model_validator(mode="after")
    def _weights_per_import(self) -> "ImageData":
        if self.weights is None:
            return self
        if isinstance(self.path, str):
            raise _KeyError(("data", "weights"), "weights are for a list of imports in data.path; "
                            "it names one")
        if len(self.weights) != len(self.path):
            raise _KeyError(("data", "weights"), f"{len(self.weights)} weights for "
                            f"{len(self.path)} imports in data.path; give one per import")
        if any(not math.isfinite(w) or w <= 0 for w in self.weights):
            raise _KeyError(("data", "weights"), f"weights must be positive numbers, got "
                            f"{self.weights}")
        return self

    @model_validator(mode="after")
    def _episode_shapes(self) -> "ImageData":
        if self.episodes == "variable":
            defaults = {name: ImageData.model_fields[name].default
                        for name in ("ways", "shots", "queries")}
            for name, default in defaults.items():
                if getattr(self, name) != default:
                    raise _KeyError(("data", name), (
                        "data.episodes: variable draws every episode's ways, shots and queries "
                        f"(Meta-Dataset's procedure); drop data.{name} or use episodes: fixed"))
        if self.source_sampling != "uniform":
            if isinstance(self.path, str):
                raise _KeyError(("data", "source_sampling"), "is for a list of imports in "
                                "data.path; it names one")
            if self.weights is not None:
                raise _KeyError(("data", "source_sampling"), f"{self.source_sampling} and "
                                "data.weights both set the imports' shares; give one")
        return self

    def sampling_weights(self) -> list[float] | str | None:
        """What ``episode_family`` takes as ``weights``."""
        return "classes" if self.source_sampling == "classes" else self.weights

    def paths(self) -> list[str]:
        """The imports episodes are drawn from, in the file's order."""
        return [self.path] if isinstance(self.path, str) else list(self.path)

    def source_weights(self) -> list[float]:
        """Each import's share of the meta-training episodes (they sum to 1)."""
        weights = self.weights or [1.0] * len(self.paths())
        return [w / sum(weights) for w in weights]

    def resolved(self) -> "ImageData":
        """Local paths made absolute (trial processes may start in another directory); URIs
        as they are."""
        absolute = [path if "://" in path else str(Path(path).resolve()) for path in self.paths()]
        return self.model_copy(update={"path": absolute[0] if isinstance(self.path, str)
                                       else absolute})

    def relative_paths(self) -> list[str]:
        """Local paths given relative to the working directory: each node of a cluster would
        read its own disk there."""
        return [path for path in self.paths() if "://" not in path and not Path(path).is_absolute()]


def _data_tag(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("family", "images" if "path" in value else "sinusoid"))
    return getattr(value, "family", "sinusoid")


DataSection = Annotated[Union[Annotated[SinusoidData, Tag("sinusoid")],
                              Annotated[ImageData, Tag("images")]], Discriminator(_data_tag)]


class ModelSection(Section):
    # For image data the default is conv4 (Sweep._backbone_for_the_data).
    backbone: str = Field("mlp", description=(
        "mlp (flat inputs), conv4 or resnet12 (images); mlp for sinusoid, conv4 for images"))
    hidden: list[int] = Field(default_factory=lambda: [40, 40], description=(
        "the MLP's hidden widths (the MAML paper's 40, 40)"))
    filters: int = Field(64, ge=1, description=(
        "Conv-4's filters per block; ResNet-12's first block (then x2.5, x5, x10)"))
    init: str | None = Field(None, description=(
        "start every trial's backbone from a trained model's: models:/NAME@ALIAS, "
        "models:/NAME/VERSION, runs:/RUN_ID/model or a model folder (Meta-Baseline: protonet "
        "from a baselinepp champion); null: from scratch"))

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        if value not in BACKBONES:
            raise ValueError(f"unknown backbone {value!r}; allowed: {', '.join(BACKBONES)}")
        return value

    @field_validator("init")
    @classmethod
    def _model_reference(cls, value: str | None) -> str | None:
        """A registry or run URI, or a folder; anything else with a scheme (s3://, http://,
        models:name) is a typo of one, not a folder."""
        if value is None or value.startswith(("models:/", "runs:/")):
            return value
        if not value.strip() or "://" in value or value.startswith(("models:", "runs:")):
            raise ValueError(f"cannot read model URI {value!r}; use {URI_FORMS}")
        return value


class Training(Section):
    meta_batch: int = Field(25, ge=1, description="tasks per outer-loop update")
    iterations: int = Field(300, ge=1, description="outer-loop updates per trial")
    eval_every: int = Field(50, ge=1, description="iterations between validations (and pruning checks)")
    eval_tasks: int = Field(100, ge=1, description="validation tasks per evaluation")
    outer_optimizer: Literal["adam", "sgd"] = Field("adam", description=(
        "the outer loop's optimiser (its rate is each algorithm's outer_lr knob)"))
    seed: int = Field(0, description="seeds initial weights, tasks and the search's sampler")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description=(
        "where meta-training runs; auto: a GPU where the trial's workers have one"))
    vectorize: Literal["auto", "on", "off"] = Field("auto", description=(
        "map a shard's tasks with torch.func.vmap instead of a loop; auto: on for mlp and on "
        "GPUs, off for conv4 on CPU, where it was measured slower"))
    inner_checkpointing: int | None = Field(None, ge=1, description=(
        "second-order inner loops (maml, metasgd, anil): recompute their activations in the "
        "outer backward, in segments of this many steps (1: least memory); null: keep them"))
    checkpoint_every: int | None = Field(None, ge=0, description=(
        "iterations between trial checkpoints (restarts and --resume start from them); null: "
        "every validation; 0: none by count"))
    checkpoint_minutes: float | None = Field(None, gt=0, description=(
        "also checkpoint once this many minutes passed since the last; null: not by time"))
    checkpoint_storage: str | None = Field(None, description=(
        "a folder or pyarrow.fs URI (s3://bucket/prefix) every node can read; null: "
        "<run_dir>/checkpoints"))

    def checkpoint_interval(self) -> int:
        """Iterations between checkpoints by count (0: none by count)."""
        return self.eval_every if self.checkpoint_every is None else self.checkpoint_every

    def checkpoints_enabled(self) -> bool:
        return self.checkpoint_interval() > 0 or self.checkpoint_minutes is not None


class Workers(Section):
    count: int = Field(2, ge=0, le=1024, description=(
        "Ray actors sharing each meta-batch; 0: in the trial's own process"))
    cpus: float = Field(1.0, ge=0, description=(
        "CPUs per worker (also its torch threads, at least 1)"))
    gpus: float = Field(0.0, ge=0, description="GPUs per worker (fractions share one)")
    driver_cpus: float = Field(1.0, ge=0, description="CPUs of each trial's own process")


# What a search can optimise, each with the one direction that makes sense for it. The first two
# are the validation loop's; the others are what adapting costs, measured as `orch compare`
# measures them (orchestrator/sweep/objectives.py).
OBJECTIVES = {"val_loss": "minimize", "val_accuracy": "maximize", "adapt_ms": "minimize",
              "inner_steps": "minimize", "parameters": "minimize"}
VALIDATION_METRICS = ("val_loss", "val_accuracy")


class MedianPruning(Section):
    """Optuna's MedianPruner: stop a trial whose validation metric is worse than the median of
    earlier trials' at the same iteration."""

    name: Literal["median"] = Field("median", description=(
        "stop a trial worse than the median of earlier trials' at the same iteration"))
    n_startup_trials: int = Field(2, ge=0, description="trials that finish before any is pruned")
    n_warmup_steps: int = Field(0, ge=0, description="iterations before a trial can be pruned")


class HyperbandPruning(Section):
    """Optuna's HyperbandPruner: successive halving over several brackets of budgets, in
    meta-iterations."""

    name: Literal["hyperband"] = Field(description=(
        "successive halving over several brackets of budgets (Li et al. 2018)"))
    min_resource: int = Field(1, ge=1, description="iterations a trial runs before its first rung")
    max_resource: int | Literal["auto"] = Field("auto", description=(
        "the most iterations a trial runs; auto: the first finished trial's last"))
    reduction_factor: int = Field(3, ge=2, description="1/reduction_factor of trials go on")


class SuccessiveHalvingPruning(Section):
    """Optuna's SuccessiveHalvingPruner (asynchronous successive halving, ASHA): at rung k, at
    iteration min_resource * reduction_factor ** (min_early_stopping_rate + k), a trial goes on
    only if it is in the top 1/reduction_factor of the trials that reached that rung."""

    name: Literal["successive_halving"] = Field(description=(
        "asynchronous successive halving (ASHA): at each rung only the top 1/reduction_factor "
        "go on"))
    min_resource: int | Literal["auto"] = Field("auto", description=(
        "iterations before the first rung; auto: estimated from the first finished trial"))
    reduction_factor: int = Field(4, ge=2, description="1/reduction_factor of trials go on")
    min_early_stopping_rate: int = Field(0, ge=0, description=(
        "the first rung at min_resource * reduction_factor ** this"))
    bootstrap_count: int = Field(0, ge=0, description=(
        "trials that must reach a rung before any goes on from it (needs an integer "
        "min_resource)"))

    @field_validator("min_resource")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"must be at least 1 or auto, got {value}")
        return value

    @model_validator(mode="after")
    def _bootstrap_needs_a_resource(self) -> "SuccessiveHalvingPruning":
        if self.bootstrap_count > 0 and self.min_resource == "auto":
            raise _KeyError(("search", "pruner", "bootstrap_count"),
                            "needs an integer min_resource (auto estimates it from the first "
                            "finished trial, which bootstrapping waits for)")
        return self

    def first_rung(self) -> int | None:
        """The iteration of the first rung; None while min_resource is auto."""
        if self.min_resource == "auto":
            return None
        return self.min_resource * self.reduction_factor ** self.min_early_stopping_rate


class NoPruning(Section):
    name: Literal["none"] = Field(description="every trial runs its iterations")


PRUNERS = {"median": MedianPruning, "hyperband": HyperbandPruning,
           "successive_halving": SuccessiveHalvingPruning, "none": NoPruning}


def _pruner_tag(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("name")
    return getattr(value, "name", None)


Pruning = Annotated[Union[Annotated[MedianPruning, Tag("median")],
                          Annotated[HyperbandPruning, Tag("hyperband")],
                          Annotated[SuccessiveHalvingPruning, Tag("successive_halving")],
                          Annotated[NoPruning, Tag("none")]], Discriminator(_pruner_tag)]


class Search(Section):
    trials: int = Field(8, ge=1, description="Optuna trials per algorithm")
    parallel: int = Field(1, ge=1, description="trials running at once")
    # TPE keeps trials running at once apart (constant liar).
    sampler: Literal["tpe", "random", "grid", "gp", "cmaes", "nsgaii"] = Field(
        "tpe", description="tpe, random, grid (choices and stepped ranges), gp (Gaussian "
        "process), cmaes (numeric ranges, one objective) or nsgaii (several objectives)")
    pruner: Pruning | None = Field(None, description=(
        "median, hyperband, successive_halving or none, or {name: ..., knob: value}; null: "
        "median with one objective, none with several (Optuna cannot prune several)"))
    metric: str | list[str] = Field("val_loss", description=(
        "val_loss or val_accuracy, or a list starting with one and adding adapt_ms, "
        "inner_steps or parameters (a Pareto front; the first picks the champion)"))
    direction: (Literal["minimize", "maximize"] | list[Literal["minimize", "maximize"]]
                | None) = Field(None, description=(
                    "follows from the metric (val_loss and costs minimised, val_accuracy "
                    "maximised); given, it must agree"))
    retries: int = Field(0, ge=0, le=10, description=(
        "reruns of a trial whose own code raised, before it counts as failed"))
    restarts: int = Field(3, ge=0, le=100, description=(
        "restarts from its checkpoint of a trial whose process or node died; past them it is "
        "set aside unfinished, for --resume"))

    @field_validator("pruner", mode="before")
    @classmethod
    def _pruner_by_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value}
        if not isinstance(value, dict) and value is not None:
            raise ValueError(f"must be a pruner's name ({', '.join(PRUNERS)}) or {{name: ..., "
                             f"knob: value}}, got {value!r}")
        if isinstance(value, dict) and "name" not in value:
            raise ValueError(f"name the pruner: {{name: {' | '.join(PRUNERS)}, ...knobs}}")
        return value

    @model_validator(mode="after")
    def _objectives_and_directions(self) -> "Search":
        names = [self.metric] if isinstance(self.metric, str) else list(self.metric)
        if not names:
            raise _KeyError(("search", "metric"), "names no objective; give val_loss or "
                            "val_accuracy, or a list starting with one")
        for name in names:
            if name not in OBJECTIVES:
                raise _KeyError(("search", "metric"), f"unknown objective {name!r}; allowed: "
                                f"{', '.join(OBJECTIVES)}")
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise _KeyError(("search", "metric"), f"{twice[0]} is named twice")
        if names[0] not in VALIDATION_METRICS:
            raise _KeyError(("search", "metric"), (
                f"{names[0]} is a cost of adapting, to trade against a validation metric: name "
                f"val_loss or val_accuracy first (it picks the champion), e.g. "
                f"[val_accuracy, {names[0]}]"))
        implied = [OBJECTIVES[name] for name in names]
        if self.direction is not None:
            given = [self.direction] if isinstance(self.direction, str) else list(self.direction)
            if len(given) != len(names):
                raise _KeyError(("search", "direction"), (
                    f"{len(given)} direction{'s' * (len(given) != 1)} for {len(names)} "
                    f"objective{'s' * (len(names) != 1)} in search.metric; leave "
                    "search.direction out: it follows from the metric"))
            for name, want, got in zip(names, implied, given):
                if want != got:
                    raise _KeyError(("search", "direction"), (
                        f"{got} contradicts search.metric {name}, which is {want[:-1]}ed; leave "
                        f"search.direction out: it follows from the metric"))
        if len(names) > 1:
            if self.pruner is not None and self.pruner.name != "none":
                raise _KeyError(("search", "pruner"), (
                    f"{self.pruner.name} prunes on one intermediate value and search.metric "
                    f"names {len(names)} objectives (Optuna cannot prune several): use none or "
                    f"leave search.pruner out"))
            if self.sampler == "cmaes":
                raise _KeyError(("search", "sampler"), (
                    f"cmaes searches one objective and search.metric names {len(names)}: use "
                    f"tpe, nsgaii, gp, random or grid"))
        return self

    @property
    def objectives(self) -> list[str]:
        """What the search optimises, in order (the first picks the champion)."""
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    @property
    def directions(self) -> list[str]:
        """Each objective's direction (``OBJECTIVES``)."""
        return [OBJECTIVES[name] for name in self.objectives]

    @property
    def first_objective(self) -> str:
        """The validation metric that is pruned on, shown as the best so far, and that decides
        the champion."""
        return self.objectives[0]

    def pruning(self) -> MedianPruning | HyperbandPruning | SuccessiveHalvingPruning | NoPruning:
        """The pruner, its default resolved: median for one objective, none for several."""
        if self.pruner is not None:
            return self.pruner
        return MedianPruning() if len(self.objectives) == 1 else NoPruning(name="none")


class Services(Section):
    outage_s: float = Field(300.0, gt=0, le=86400, description=(
        "seconds the Optuna storage, MLflow server or checkpoint store may be away (retried, "
        "trials training) before the sweep stops, resumable"))


class Range(Section):
    """A searchable numeric range: ``{low, high, log?, int?, step?}``."""

    low: float
    high: float
    log: bool = False
    int: bool = False
    step: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"step must be positive, got {self.step}")
        if self.step is not None and self.log and not (self.int and self.step == 1):
            raise ValueError("a log range cannot have a step (Optuna steps linearly); drop one")
        return self


class Choices(Section):
    """A categorical knob: ``{choices: [a, b, c]}``."""

    choices: list[Any] = Field(min_length=1)


# Knobs every algorithm has besides its own hyperparameters.
OUTER_KNOBS = {"outer_lr": 0.001, "meta_batch": None}


class AlgorithmSpace(BaseModel):
    """One algorithm's search space: each knob fixed or a range. Validated against the learner's
    hyperparameters in ``Sweep._check_algorithms`` because the allowed keys depend on the name."""

    model_config = ConfigDict(extra="allow", frozen=True)

    def knobs(self) -> dict[str, Range | Choices | bool | int | float | str]:
        """Each knob as a ``Range``, ``Choices`` or a fixed scalar (validated at load time)."""
        return {knob: parse_knob(value) for knob, value in (self.model_extra or {}).items()}


def parse_knob(value: Any) -> Range | Choices | bool | int | float | str:
    if isinstance(value, (Range, Choices)):
        return value
    if isinstance(value, dict):
        return Choices.model_validate(value) if "choices" in value else Range.model_validate(value)
    if isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"must be a number, a string, {{low, high, log, int}} or {{choices: [...]}}, "
                     f"got {type(value).__name__}")


class Sweep(Section):
    name: str = Field(description=(
        "the MLflow experiment's name and the Optuna studies' prefix (<name>/<algorithm>)"))
    run_dir: str = Field(DEFAULT_RUN_DIR, description=(
        "where the local stores, artifacts and checkpoints go"))
    storage: str | None = Field(None, description=(
        "Optuna storage URL; null: sqlite:///<run_dir>/optuna.db; on a cluster of several "
        "hosts postgresql://..."))
    tracking: Tracking = Tracking()
    ray: RaySection = RaySection()
    data: DataSection = SinusoidData()
    model: ModelSection = ModelSection()
    training: Training = Training()
    workers: Workers = Workers()
    search: Search = Search()
    services: Services = Services()
    algorithms: dict[str, AlgorithmSpace] = Field(min_length=1, description=(
        "each algorithm to tune and its knobs: a fixed value, {low, high, log, int, step} or "
        "{choices: [...]}; left out, its default search space"))

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not NAME_PATTERN.match(value):
            raise ValueError("must be 1-100 letters, digits, '_', '.' or '-', starting with a letter or digit")
        return value

    @model_validator(mode="before")
    @classmethod
    def _backbone_for_the_data(cls, value: Any) -> Any:
        """The default backbone suits the data: mlp for sinusoid's numbers, conv4 for images."""
        if not isinstance(value, dict):
            return value
        model, data = value.get("model"), value.get("data")
        if (model is None or isinstance(model, dict) and "backbone" not in model) and \
                isinstance(data, dict) and _data_tag(data) == "images":
            return {**value, "model": {**(model or {}), "backbone": "conv4"}}
        return value

    @field_validator("algorithms", mode="before")
    @classmethod
    def _none_means_defaults(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: ({} if v is None else v) for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _check_algorithms(self) -> "Sweep":
        for algorithm, space in self.algorithms.items():
            if algorithm not in LEARNERS:
                raise _KeyError(("algorithms", algorithm),
                                f"unknown algorithm; allowed: {', '.join(sorted(LEARNERS))}")
            hparams = learner_class(algorithm).Hyperparameters
            allowed = {**hparams.model_fields, **OUTER_KNOBS}
            if learner_class(algorithm).embeds:
                allowed[METHOD_KNOB] = None
            for knob, raw in (space.model_extra or {}).items():
                where = ("algorithms", algorithm, knob)
                if knob == METHOD_KNOB or knob in method_knobs():
                    _check_transductive_knob(where, space.model_extra or {})
                    continue
                method = knob.partition("_")[0]
                if method in METHODS and learner_class(algorithm).embeds:
                    known = sorted(k for k, (m, _) in method_knobs().items() if m == method)
                    raise _KeyError(where, f"unknown knob of transductive method {method}; "
                                    f"allowed: {', '.join(known)}")
                if knob not in allowed:
                    raise _KeyError(where, f"unknown knob; allowed: {', '.join(sorted(allowed))}")
                try:
                    value = parse_knob(raw)
                except ValidationError as error:
                    raise _KeyError(where, _first_problem(error).removeprefix("(top level): ")) from None
                except ValueError as error:
                    raise _KeyError(where, str(error)) from None
                _check_knob(where, knob, value)
                if knob in hparams.model_fields:
                    _check_against_field(where, hparams, knob, value)
        kind = "regression" if self.data.family == "sinusoid" else "classification"
        flat = self.model.backbone == "mlp"
        if self.model.init is not None and kind == "regression":
            raise _KeyError(("model", "init"), "starts a backbone from an image classification "
                            "model's; data.family sinusoid is regression: leave init out")
        if flat != (kind == "regression"):
            raise _KeyError(("model", "backbone"), (
                f"{self.model.backbone} reads images; data.family sinusoid has flat inputs: use mlp"
                if kind == "regression" else
                "mlp reads flat inputs; data.family images has images: use conv4 or resnet12"))
        for algorithm in self.algorithms:
            why = learner_class(algorithm).unsupported_backbones.get(self.model.backbone)
            if why:
                raise _KeyError(("algorithms", algorithm),
                                f"cannot use model.backbone {self.model.backbone}: {why}")
        for algorithm in self.algorithms:
            if kind not in learner_class(algorithm).task_kinds:
                raise _KeyError(("algorithms", algorithm),
                                f"is for {' and '.join(learner_class(algorithm).task_kinds)}; "
                                f"data.family {self.data.family} is {kind}")
        if isinstance(self.data, ImageData):
            for algorithm in self.algorithms:
                _check_task_shape(algorithm, self.space(algorithm), self.data)
                if (learner_class(algorithm).family == "pretrained"
                        and not isinstance(self.data.path, str)):
                    raise _KeyError(("algorithms", algorithm), (
                        "pretrains one classifier over the classes of one import; data.path "
                        "lists several: give it one (or pretrain on each and start from it "
                        "with model.init)"))
        if self.training.inner_checkpointing is not None:
            _check_inner_checkpointing(self)
        return self

    @model_validator(mode="after")
    def _check_sampler(self) -> "Sweep":
        """Refuse a search space the chosen sampler cannot search as asked, rather than let
        Optuna fall back to another sampler on the knobs it cannot handle."""
        for algorithm in self.algorithms:
            space = self.space(algorithm)
            for knob, value in space.items():
                where = ("algorithms", algorithm, knob)
                origin = "" if knob in self.algorithms[algorithm].knobs() else \
                    f" (from {algorithm}'s default search space)"
                if (self.search.sampler == "grid" and isinstance(value, Range)
                        and not value.int and value.step is None):
                    raise _KeyError(where, f"search.sampler grid cannot enumerate a continuous "
                                    f"range{origin}; give it a step > 0, int: true, choices or "
                                    f"a fixed value")
                if self.search.sampler == "cmaes" and isinstance(value, Choices):
                    raise _KeyError(where, f"search.sampler cmaes cannot search choices{origin}; "
                                    f"use a range, a fixed value or another sampler (tpe, "
                                    f"random, grid, gp)")
            if self.search.sampler == "grid":
                points = math.prod(len(grid_values(v)) for v in space.values()
                                   if isinstance(v, (Range, Choices)))
                if self.search.trials > points:
                    raise _KeyError(("search", "trials"), f"{self.search.trials} trials exceed "
                                    f"the {points} points of {algorithm}'s grid; set at most "
                                    f"{points}")
        return self

    @model_validator(mode="after")
    def _check_search(self) -> "Sweep":
        """Refuse objectives the data cannot give and pruner knobs that could never prune
        within ``training.iterations`` (the steps a trial reports are its iterations)."""
        if self.data.family == "sinusoid" and "val_accuracy" in self.search.objectives:
            raise _KeyError(("search", "metric"), "val_accuracy needs a classification data set; "
                            "sinusoid is regression: use val_loss")
        pruner, iterations = self.search.pruner, self.training.iterations
        where = ("search", "pruner")
        if isinstance(pruner, MedianPruning) and pruner.n_warmup_steps >= iterations:
            raise _KeyError(where + ("n_warmup_steps",), (
                f"{pruner.n_warmup_steps} is not below training.iterations {iterations}: "
                "pruning could stop a trial at its last iteration only, saving nothing"))
        if isinstance(pruner, HyperbandPruning):
            if pruner.min_resource >= iterations:
                raise _KeyError(where + ("min_resource",), (
                    f"{pruner.min_resource} is not below training.iterations {iterations}: "
                    "pruning could stop a trial at its last iteration only, saving nothing"))
            if pruner.max_resource != "auto" and not (
                    pruner.min_resource < pruner.max_resource <= iterations):
                raise _KeyError(where + ("max_resource",), (
                    f"{pruner.max_resource} must exceed min_resource {pruner.min_resource} and "
                    f"not exceed training.iterations {iterations} (auto: a trial's last "
                    "iteration)"))
        if isinstance(pruner, SuccessiveHalvingPruning):
            rung = pruner.first_rung()
            if rung is not None and rung >= iterations:
                raise _KeyError(where, (
                    f"its first rung is at iteration {rung} (min_resource * reduction_factor ** "
                    f"min_early_stopping_rate), not below training.iterations {iterations}: "
                    "pruning could stop a trial at its last iteration only, saving nothing"))
        return self

    # -- derived values -------------------------------------------------------------------------

    def space(self, algorithm: str) -> dict[str, Range | Choices | bool | int | float | str]:
        """What Optuna searches for ``algorithm``: the learner's default search space
        (``Learner.search_space``) for every knob the file leaves out, the file's knobs as given.
        An algorithm listed with no knobs is therefore tuned over its defaults."""
        defaults = {knob: parse_knob(value)
                    for knob, value in learner_class(algorithm).search_space.items()}
        return {**defaults, **self.algorithms[algorithm].knobs()}

    def run_path(self) -> Path:
        return Path(self.run_dir)

    def tracking_uri(self, override: str | None = None) -> str:
        return (override or os.environ.get("MLFLOW_TRACKING_URI") or self.tracking.uri
                or f"sqlite:///{self.run_path() / 'mlflow.db'}")

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{self.run_path() / 'optuna.db'}"

    def checkpoint_uri(self) -> str:
        """The trial checkpoints' folder or URI (``training.checkpoint_storage``)."""
        return self.training.checkpoint_storage or str(self.run_path() / "checkpoints")

    def task_fingerprint(self) -> str:
        """Hash of the task distribution; champions are only compared on equal fingerprints.
        Image data count by content -- the digests of the import's files, from its manifest --
        never by path: a moved or copied import keeps its champion comparable, while another
        import written to the same path does not."""
        spec = self.data.model_dump(mode="json")
        if isinstance(self.data, ImageData):
            from pipelines.dataset import read_manifest  # pyarrow only where images are used

            digests = [{name: entry["sha256"] for name, entry in
                        sorted(read_manifest(path)["files"].items())} for path in self.data.paths()]
            spec["path"] = digests[0] if isinstance(self.data.path, str) else digests
            if isinstance(self.data.path, str):  # as before mixes: champions stay comparable
                del spec["weights"]
            elif self.data.source_sampling == "uniform":  # [2, 1] and [0.67, 0.33]: one mix
                spec["weights"] = self.data.source_weights()
            # As before these keys existed, so that champions stay comparable.
            if self.data.episodes == "fixed":
                del spec["episodes"]
            if self.data.source_sampling == "uniform":
                del spec["source_sampling"]
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


class _KeyError(ValueError):
    def __init__(self, where: tuple[str, ...], message: str):
        super().__init__(message)
        self.where = where
        self.message = message

    def __reduce__(self):  # picklable, so an error in a worker process reaches its parent
        return type(self), (self.where, self.message)


def grid_values(knob: Range | Choices) -> list[Any]:
    """The values ``search.sampler: grid`` tries for a searched knob: every choice, or every
    step of a range from ``low`` up to ``high`` (a float range without a step has none)."""
    if isinstance(knob, Choices):
        return list(knob.choices)
    if knob.int:
        return list(range(int(knob.low), int(knob.high) + 1, int(knob.step or 1)))
    if knob.step is None:
        raise ValueError("a continuous range has no grid: give it a step")
    # In decimal, as Optuna steps a range: 0.1 to 0.3 by 0.1 is three points, not two.
    low, high, step = (Decimal(str(v)) for v in (knob.low, knob.high, knob.step))
    return [float(low + i * step) for i in range(int((high - low) // step) + 1)]


def _check_knob(where: tuple[str, ...], knob: str, value: Any) -> None:
    numbers = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []
    if isinstance(value, Range):
        numbers = [value.low, value.high]
    if isinstance(value, Choices):
        numbers = [v for v in value.choices if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if knob.endswith("lr") and any(n <= 0 for n in numbers):
        raise _KeyError(where, "learning rates must be > 0")
    if any(isinstance(n, float) and not math.isfinite(n) for n in numbers):
        raise _KeyError(where, "must be finite")


def _candidates(value: Range | Choices | bool | int | float | str) -> list[Any]:
    """The values a knob can take that bound what it may do: both ends of a range, every choice."""
    if isinstance(value, Range):
        return [int(value.low), int(value.high)] if value.int else [value.low, value.high]
    if isinstance(value, Choices):
        return list(value.choices)
    return [value]


def _check_against_field(where: tuple[str, ...], hparams: type[BaseModel], knob: str,
                         value: Any) -> None:
    """Validate a fixed value, both ends of a range, or every choice against the learner's field."""
    for candidate in _candidates(value):
        try:
            hparams.model_validate({knob: candidate})
        except ValidationError as error:
            problem = error.errors()[0]
            raise _KeyError(where, f"{problem['msg']} (got {candidate!r})") from None


def _check_transductive_knob(where: tuple[str, ...], knobs: dict[str, Any]) -> None:
    """``transductive`` (a method, ``none`` or choices of them) and ``<method>_<knob>`` knobs:
    only for learners with embeddings, each method knob valid for its method and its method
    among ``transductive``'s values (learners/transduction.py)."""
    algorithm, knob = where[1], where[2]
    try:
        check_learner(learner_class(algorithm))
    except TransductionError as error:
        raise _KeyError(where, str(error)) from None
    try:
        value = parse_knob(knobs[knob])
    except (ValueError, ValidationError) as error:
        raise _KeyError(where, str(error).splitlines()[0]) from None
    methods = [NONE, *METHODS]
    if knob == METHOD_KNOB:
        if isinstance(value, Range):
            raise _KeyError(where, f"a method, not a range; give one of {', '.join(methods)} or "
                            "{choices: [...]} of them")
        unknown = [v for v in _candidates(value) if v not in methods]
        if unknown:
            raise _KeyError(where, f"unknown transductive method {unknown[0]!r}; allowed: "
                            f"{', '.join(methods)}")
        return
    method, field = method_knobs()[knob]
    _check_knob(where, knob, value)
    _check_against_field(where, METHODS[method].Knobs, field, value)
    chosen = _candidates(parse_knob(knobs.get(METHOD_KNOB, NONE)))
    if method not in chosen:
        raise _KeyError(where, f"is a knob of transductive method {method}, which "
                        f"{METHOD_KNOB} ({', '.join(map(str, chosen))}) does not choose; set "
                        f"{METHOD_KNOB}: {method} (or choices including it)")


def _check_task_shape(algorithm: str, space: dict[str, Any], data: ImageData) -> None:
    """Refuse an algorithm whose knobs build a model that cannot serve the data's episodes (SNAIL's
    label width and sequence length): each searched knob is checked at every candidate value,
    the others at their fixed value or default."""
    cls = learner_class(algorithm)
    fixed = {k: v for k, v in space.items()
             if k in cls.Hyperparameters.model_fields and not isinstance(v, (Range, Choices))}
    settings = [fixed] + [{**fixed, knob: candidate}
                          for knob, value in space.items()
                          if knob in cls.Hyperparameters.model_fields
                          and isinstance(value, (Range, Choices))
                          for candidate in _candidates(value)]
    if data.episodes == "variable":
        from pipelines.variable_episodes import MAX_SUPPORT, MAX_WAYS  # pyarrow: images only

        ways, support = MAX_WAYS, MAX_SUPPORT
    else:
        ways, support = data.ways, data.ways * data.shots
    for setting in settings:
        hparams = cls.Hyperparameters.model_validate(setting)
        if data.episodes == "variable" and cls.needs_head and \
                getattr(hparams, "head", "fixed") == "fixed":
            fix = ("set head: zero or shared" if "head" in cls.Hyperparameters.model_fields
                   else "use a learner that serves any number of classes (metric, closed-form "
                        "or pretrained)")
            raise _KeyError(("algorithms", algorithm), (
                f"has a fixed N-way output layer; data.episodes: variable draws 5 to {ways} "
                f"ways per episode: {fix}"))
        try:
            cls.check_task_shape(hparams, ways=ways, support=support)
        except ValueError as error:
            raise _KeyError(("algorithms", algorithm), str(error)) from None


def _check_inner_checkpointing(sweep: Sweep) -> None:
    """Refuse ``training.inner_checkpointing`` for a sweep where it could not do what it says:
    an algorithm whose inner loop it does not recompute, or ``vectorize: on``."""
    where = ("training", "inner_checkpointing")
    applies = [n for n, c in LEARNERS.items() if c.inner_checkpointing_refusal is None]
    for algorithm in sweep.algorithms:
        refusal = learner_class(algorithm).inner_checkpointing_refusal
        if refusal is not None:
            raise _KeyError(where, f"{algorithm} {refusal}; it applies to {', '.join(applies)}: "
                            f"leave the key out or run {algorithm} in another sweep")
    if sweep.training.vectorize == "on":
        raise _KeyError(where, "recomputes the inner loop in the per-task autograd loop; "
                        "vectorize: on maps tasks with torch.func.vmap: set vectorize auto or off")


def load_sweep(path: str | os.PathLike[str]) -> Sweep:
    """Read and validate a sweep file; raise ``ConfigError`` with one line saying what is wrong."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read sweep file ({error.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}:{where} not valid YAML: {problem}") from None
    if raw is None:
        raise ConfigError(f"{path}: the sweep file is empty; it needs at least 'name' and 'algorithms'")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the sweep file must be a mapping of sections, got a {type(raw).__name__}")
    return sweep_from_dict(raw, source=str(path))


def sweep_from_dict(raw: dict[str, Any], *, source: str = "<sweep>") -> Sweep:
    try:
        return Sweep.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{source}: {_first_problem(error)}") from None


def _first_problem(error: ValidationError) -> str:
    problem = error.errors()[0]
    context = problem.get("ctx", {}).get("error")
    if isinstance(context, _KeyError):
        return f"{'.'.join(context.where)}: {context.message}"
    location = [str(part) for part in problem["loc"]]
    # Union members (sinusoid/images, Range/Choices/scalars) add their tag to the path; drop it.
    location = [part for part in location if part not in {"sinusoid", "images", "Range", "Choices",
                                                           "bool", "int", "float", "str",
                                                           *PRUNERS}
                and not part.startswith(("literal[", "list["))]
    key = ".".join(location) or "(top level)"
    message = problem["msg"].removeprefix("Value error, ")
    if problem["type"] == "extra_forbidden":
        allowed = _allowed_keys(problem["loc"][:-1])
        message = "unknown key" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
    elif problem["type"] == "missing":
        message = "required key is missing"
    elif problem["type"] == "union_tag_invalid" and location[-1:] == ["pruner"]:
        message = f"unknown pruner {problem['ctx']['tag']!r}; allowed: {', '.join(PRUNERS)}"
    elif problem["type"] == "union_tag_invalid":
        message = f"unknown family {problem['ctx']['tag']!r}; allowed: sinusoid, images"
        key += ".family"
    elif "input" in problem and problem["type"] not in {"value_error"}:
        message = f"{message} (got {problem['input']!r})"
    return f"{key}: {message}"


def _allowed_keys(location: tuple[Any, ...]) -> list[str]:
    model: Any = Sweep
    for part in location:
        if part in ("sinusoid", "images"):
            model = SinusoidData if part == "sinusoid" else ImageData
            continue
        if part in PRUNERS:
            model = PRUNERS[part]
            continue
        field = getattr(model, "model_fields", {}).get(part)
        annotation = field.annotation if field is not None else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return sorted(getattr(model, "model_fields", {}))
