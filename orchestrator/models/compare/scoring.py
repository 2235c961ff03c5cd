"""Scoring: each model on each setting's shared episodes (``score``), what adapting costs it
(``Cost``: milliseconds per episode, inner steps, parameters -- also what a sweep's cost
objectives measure), and the paired statistics of the table (``paired_rows``): per setting, each
model's per-episode difference to the best, with its 95% interval."""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from orchestrator.errors import first_line
from orchestrator.models.compare.cache import cache_key, read_cached, write_cached
from orchestrator.models.compare.settings import Entrant, Episodes, Setting
from orchestrator.models.inference import Evaluation, InferenceError, evaluate, interval95
from orchestrator.training.meta_model import MetaModel
from pipelines.base import task_seed
from pipelines.shifts import apply_shift


@dataclass(frozen=True)
class Cost:
    """What adapting costs one model in one setting. ``adapt_ms``: the mean wall milliseconds of
    adapting to an episode's support set and predicting its queries, over the setting's episodes
    after the first (a warm-up: first calls allocate and pick kernels), sampling and scoring
    excluded; ``inner_steps``: the gradient steps one adaptation takes (``inner_steps``);
    ``parameters``: the meta-parameters' count (``parameter_count``); ``timed_on``: where and
    when ``adapt_ms`` was measured (``timing_context``)."""

    adapt_ms: float
    inner_steps: int
    parameters: int
    timed_on: str


def inner_steps(model: MetaModel, evaluation: Evaluation, steps: int | None) -> int:
    """Gradient steps one adaptation takes at test on the evaluation's support sets
    (``Learner.adaptation_steps``): ``steps`` (``--steps``) or the trained inner steps for the
    gradient family, the head fit's SGD steps for Baseline and Baseline++, 0 for learners that
    adapt without gradient steps."""
    if evaluation.episodes == "variable":
        support = round(float(np.mean(evaluation.support_sizes)))
    else:
        support = (evaluation.ways or 1) * evaluation.shots
    extra = model.transduction.gradient_steps() if model.transduction is not None else 0
    return model.learner.adaptation_steps(support, steps) + extra


def parameter_count(model: MetaModel) -> int:
    """Entries of the meta-parameters: every learned tensor of the saved model (heads, learned
    rates and a learner's own networks included), running statistics (MAML++) left out."""
    return sum(value.numel() for name, value in model.params.items()
               if not model.learner.is_statistic(name))


def timing_context() -> str:
    """Where this process times adaptation: host, device and torch threads, and the date."""
    import datetime

    return (f"{platform.node() or 'unknown host'}, cpu, {torch.get_num_threads()} torch "
            f"thread{'s' * (torch.get_num_threads() != 1)}, "
            f"{datetime.date.today().isoformat()}")


def warm_ms(seconds: Sequence[float]) -> float:
    """Mean milliseconds per episode after the first, the warm-up (``orch compare`` scores at
    least two)."""
    return 1000.0 * float(np.mean(seconds[1:]))


@dataclass
class Cell:
    """One model in one setting: its evaluation and cost, or why it was refused."""

    entrant: Entrant
    setting: Setting
    evaluation: Evaluation | None = None
    refused: str | None = None
    cached: bool = False
    cost: Cost | None = None


def score(entrant: Entrant, setting: Setting, episodes: Episodes, *, steps: int | None,
          cache: Path | None, on_task: Callable[[int], None] | None = None) -> Cell:
    """``entrant`` on the setting's episodes, read from the cache when it was scored before."""
    model = entrant.model
    if entrant.refused is not None:
        return Cell(entrant, setting, refused=entrant.refused)
    try:
        family = episodes.family(setting, model)
    except (InferenceError, ValueError) as error:  # check_ways / check_task_shape refusals
        return Cell(entrant, setting, refused=first_line(error))
    key = cache_key(entrant, setting, episodes, steps)
    cached = read_cached(cache, key)
    if cached is not None:
        evaluation, timed_on = cached
        if on_task is not None:
            on_task(episodes.tasks)
        return Cell(entrant, setting, evaluation, cached=True,
                    cost=cost(model, evaluation, steps, timed_on))
    transform = None
    if setting.shift is not None:
        shift, level, treatment = setting.shift, setting.level, family.preprocessing()

        def transform(index: int, queries: torch.Tensor) -> torch.Tensor:
            # The same distortion for every model: seeded by the episode, not the model.
            generator = torch.Generator().manual_seed(
                task_seed(episodes.seed, f"{episodes.split}/shift", index))
            # In the treatment of the tensors this model sees (its own where converted).
            return apply_shift(queries, shift, level, preprocessing=treatment,
                               generator=generator)

    evaluation = evaluate(model, family, split=episodes.split, tasks=episodes.tasks,
                          seed=episodes.seed, steps=steps, on_task=on_task,
                          transform_queries=transform)
    timed_on = timing_context()
    write_cached(cache, key, entrant, setting, evaluation, timed_on)
    return Cell(entrant, setting, evaluation, cost=cost(model, evaluation, steps, timed_on))


def cost(model: MetaModel, evaluation: Evaluation, steps: int | None, timed_on: str) -> Cost:
    """What adapting cost ``model`` in ``evaluation`` (timed ``timed_on``); a sweep's cost
    objectives are this too (``orchestrator.sweep.objectives``)."""
    return Cost(warm_ms(evaluation.seconds), inner_steps(model, evaluation, steps),
                parameter_count(model), timed_on)


@dataclass
class Row:
    """One model in one setting, with its paired difference to the setting's best model."""

    setting: Setting
    model: str
    uri: str
    metric: str | None = None
    mean: float | None = None
    ci95: float | None = None
    tasks: int | None = None
    diff_to_best: float | None = None
    diff_ci95: float | None = None
    significant: bool = False
    best: bool = False
    log_likelihood: float | None = None
    log_likelihood_ci95: float | None = None
    coverage95: float | None = None
    adapt_ms: float | None = None  # the cost of adapting (``Cost``)
    inner_steps: int | None = None
    parameters: int | None = None
    refused: str | None = None
    cached: bool = False  # read from the cache, not scored in this call
    data: str | None = None  # the import the episodes came from; None: sampled (regression)
    converted: bool = False  # its images converted to this model's treatment (--convert)
    transductive: str | None = None  # the method classifying its queries together, if any

    def record(self) -> dict[str, Any]:
        """The row as plain values (the CSV and JSON forms)."""
        values = {k: v for k, v in asdict(self).items() if k != "setting"}
        return {"setting": self.setting.name, "ways": self.setting.ways,
                "shots": self.setting.shots, "shift": self.setting.shift,
                "level": self.setting.level if self.setting.shift else 0.0, **values}


def paired_rows(cells: Sequence[Cell], episodes: Episodes | None = None) -> list[Row]:
    """Rows of one setting: each served model's mean with its interval and its per-episode
    difference to the best model (highest accuracy, lowest MSE) with the difference's interval;
    ``significant`` when that interval excludes zero."""
    served = [cell for cell in cells if cell.evaluation is not None]
    best = None
    if served:
        lower_is_better = served[0].evaluation.metric == "mse"
        pick = min if lower_is_better else max
        best = pick(served, key=lambda cell: cell.evaluation.mean)
    rows = []
    for cell in cells:
        transduction = cell.entrant.transduction
        row = Row(cell.setting, cell.entrant.label, cell.entrant.uri, refused=cell.refused,
                  cached=cell.cached, data=episodes.data if episodes else None,
                  converted=bool(episodes) and cell.entrant.label in episodes.converted,
                  transductive=transduction.describe() if transduction is not None else None)
        evaluation = cell.evaluation
        if evaluation is not None:
            row.metric, row.mean, row.ci95 = evaluation.metric, evaluation.mean, evaluation.ci95
            row.tasks = len(evaluation.per_task)
            difference = (np.asarray(evaluation.per_task)
                          - np.asarray(best.evaluation.per_task))
            row.diff_to_best, row.diff_ci95 = float(difference.mean()), interval95(difference)
            row.best = cell is best
            row.significant = (not row.best) and abs(row.diff_to_best) > row.diff_ci95
            uncertainty = evaluation.uncertainty_means()
            if uncertainty:
                row.log_likelihood, row.log_likelihood_ci95 = uncertainty["log_likelihood"]
                row.coverage95 = uncertainty["coverage95"][0]
        if cell.cost is not None:
            row.adapt_ms = cell.cost.adapt_ms
            row.inner_steps, row.parameters = cell.cost.inner_steps, cell.cost.parameters
        rows.append(row)
    return rows


@dataclass
class Comparison:
    settings: list[Setting]
    rows: list[Row]
    kind: str
    notes: list[str] = field(default_factory=list)
    data: str | None = None  # the import the episodes came from; None: sampled (regression)

    def records(self) -> list[dict[str, Any]]:
        return [row.record() for row in self.rows]


def run_comparison(entrants: Sequence[Entrant], settings: Sequence[Setting], episodes: Episodes,
                   *, steps: int | None = None, cache: Path | None = None,
                   progress: Callable[[float, str], None] | None = None) -> Comparison:
    """Score every entrant in every setting (cells in setting order) and pair them up."""
    rows: list[Row] = []
    scored: list[Cell] = []
    total = len(entrants) * len(settings)
    done = 0
    for setting in settings:
        cells = []
        for entrant in entrants:
            what = f"{entrant.label} {setting.name}"
            if progress is not None:
                progress(done, what)
            on_task = None if progress is None else (
                lambda finished, done=done, what=what:
                progress(done + finished / episodes.tasks, what))
            cells.append(score(entrant, setting, episodes, steps=steps, cache=cache,
                               on_task=on_task))
            done += 1
        rows += paired_rows(cells, episodes)
        scored += cells
    if progress is not None:
        progress(total, "done")
    # A refusal of the entrant itself (no embedding for its method) is said once.
    notes = [f"{e.label} refused: {e.refused}" for e in entrants if e.refused is not None]
    whole = {e.label for e in entrants if e.refused is not None}
    notes += [f"{row.model} refused in {row.setting.name}: {row.refused}"
              for row in rows if row.refused and row.model not in whole]
    notes += timing_notes(scored)
    if any(s.shift == "rotate" for s in settings):
        notes += [f"{e.label} was trained with 90-degree rotations as classes: rotations by "
                  "multiples of 90 degrees are not a shift for it" for e in entrants
                  if e.model.spec["sweep"]["data"].get("augment_rotations")]
    notes += [f"{e.label} saw the episodes of {episodes.data} converted to its input "
              f"({describe_treatment(e.model.spec['preprocessing'])}) from "
              f"{describe_treatment(episodes.preprocessing)}"
              for e in entrants if e.label in episodes.converted]
    return Comparison(list(settings), rows, episodes.kind, notes, episodes.data)


def describe_treatment(preprocessing: dict[str, Any]) -> str:
    """``28x28 L, inverted`` for a preprocessing record."""
    size = preprocessing.get("size")
    return (f"{size}x{size} {preprocessing.get('mode')}"
            + (", inverted" if preprocessing.get("invert") else "")
            + (f", {preprocessing['normalization']}"
               if preprocessing.get("normalization", "none") != "none" else ""))


def timing_notes(cells: Sequence[Cell]) -> list[str]:
    """Where the costs were timed, when not all in this call: a cached cell's milliseconds
    were measured when it was first scored, maybe on another machine or under another load."""
    cached = [cell for cell in cells if cell.cached and cell.cost is not None]
    if not cached:
        return []
    places = sorted({cell.cost.timed_on for cell in cached})
    return [f"ms/episode of {len(cached)} cached cell{'s' * (len(cached) != 1)} "
            f"({', '.join(sorted({cell.entrant.label for cell in cached}))}) were timed when "
            f"first scored ({'; '.join(places)}), the others in this call ({timing_context()}); "
            "give --cache an empty folder to time every model together"]
