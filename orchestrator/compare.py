"""``orch compare``: several trained models scored on the same episodes, as a paired comparison.

A survey table needs more than each model's mean: it needs to say whether one model is really
better than another. Scoring every model on the *same* episodes (same seed, classes, images and,
under a shift, the same distortions) makes the comparison paired: per setting, each model's
per-episode score minus the best model's has a much smaller spread than two independent means,
so its 95% interval (1.96 std / sqrt(episodes)) tells a real difference from episode noise.

Settings are every (ways, shots) pair asked for, plus a shift curve: the first (ways, shots) with
the query images distorted at each level (``pipelines.shifts``). A model that cannot serve a
setting (a fixed 5-way head asked for 20 ways, SNAIL asked for a longer support sequence than it
was built for) is marked refused in that setting, with the reason, and left out of its pairing;
models that cannot be compared at all (trained on other image sizes or channels than the data,
regression beside classification) are refused before anything is scored -- unless ``--convert``
gives the data's images each such model's own treatment (cross-domain: every model still sees
the same episodes, each converted to its input). Every row records the import its episodes came
from and whether they were converted.

A model can also be scored with its queries classified together by a transductive method
(``--transductive``, or the method it was validated with): it then takes part twice, one at a
time and transductively (``NAME +tim``), on the same episodes, so the paired difference says
what transduction gains. ``--episodes variable`` adds Meta-Dataset-style episodes
(``pipelines/variable_episodes.py``) as a setting of their own.

Beside each score, what adapting costs (``Cost``): the mean wall milliseconds to adapt to one
episode and predict its queries -- timed around that call alone, on the same episodes, in this
process's device and threads, after a warm-up episode -- the inner gradient steps adaptation takes
and the number of meta-parameters: how a practitioner chooses between a ProtoNet and a MAML.

Each (model content, setting, episodes) result is cached as JSON under the run folder, so a rerun
with one more model scores only that model; its cost was timed when it was first scored, and says
where.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import platform
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from learners.transduction import Transduction, TransductionError
from orchestrator.config import DEFAULT_RUN_DIR
from orchestrator.errors import UserError, first_line
from orchestrator.inference import (Evaluation, InferenceError, ModelSource, evaluate,
                                    evaluation_family, interval95, load, needs_conversion,
                                    resolve)
from orchestrator.meta_model import MetaModel
from pipelines.base import TaskFamily, task_seed
from pipelines.shifts import apply_shift

EXPERIMENT = "orch-compare"
DEFAULT_QUERIES = 15  # query images per class at test, as in the papers' protocols
CSV_COLUMNS = ("setting", "ways", "shots", "shift", "level", "model", "uri", "metric", "mean",
               "ci95", "tasks", "diff_to_best", "diff_ci95", "significant", "best",
               "log_likelihood", "log_likelihood_ci95", "coverage95", "adapt_ms", "inner_steps",
               "parameters", "refused", "cached", "data", "converted", "transductive")


class CompareError(UserError):
    """Models or settings ``orch compare`` cannot compare; the message is one line."""


@dataclass(frozen=True)
class Setting:
    """One column of the comparison: N-way (None for regression) K-shot, optionally shifted; or
    Meta-Dataset-style variable-way episodes (``episodes`` "variable", no ways or shots)."""

    ways: int | None
    shots: int
    shift: str | None = None
    level: float = 0.0
    episodes: str = "fixed"

    @property
    def name(self) -> str:
        if self.episodes == "variable":
            return "variable"
        base = f"{self.ways}way{self.shots}shot" if self.ways else f"{self.shots}shot"
        return base if self.shift is None else f"{base}.{self.shift}{self.level:g}"

    def key(self) -> dict[str, Any]:
        """The setting in cache keys (as before variable episodes, for fixed ones)."""
        values = asdict(self)
        if self.episodes == "fixed":
            del values["episodes"]
        return values


VARIABLE = Setting(None, 0, episodes="variable")


def plan_settings(ways: Sequence[int | None], shots: Sequence[int],
                  shift: tuple[str, Sequence[float]] | None = None, *,
                  fixed: bool = True, variable: bool = False) -> list[Setting]:
    """Every (ways, shots) pair, then the shift curve at the first pair (level 0 of a shift is
    the unshifted setting, listed once), then the variable-way episodes; ``fixed`` False leaves
    out the pairs and the shift."""
    settings = [Setting(w, s) for w in ways for s in shots] if fixed else []
    if shift is not None and fixed:
        kind, levels = shift
        settings += [Setting(ways[0], shots[0], kind, float(level)) for level in levels
                     if level != 0]
    return settings + ([VARIABLE] if variable else [])


@dataclass
class Entrant:
    """A model taking part: its label in the table, where it came from and a digest of its
    weights and spec (the cache key: a new version of a model is scored anew)."""

    label: str
    uri: str
    source: ModelSource
    model: MetaModel  # classifying queries by ``model.transduction`` (None: one at a time)
    digest: str
    # Why this entrant cannot be scored at all (a transductive method on a learner without
    # embeddings): every cell is marked refused with it.
    refused: str | None = None

    @property
    def transduction(self) -> Transduction | None:
        return self.model.transduction if self.model is not None else None


def model_digest(model: MetaModel) -> str:
    hasher = hashlib.sha256(json.dumps(model.spec, sort_keys=True, default=str).encode())
    for name in sorted(model.params):
        hasher.update(name.encode())
        hasher.update(model.params[name].detach().contiguous().numpy().tobytes())
    return hasher.hexdigest()[:20]


def label_of(uri: str) -> str:
    """A short name for the table: ``orch-maml@champion``, ``orch-maml/3`` or a folder's name."""
    if uri.startswith(("models:/", "runs:/")):
        return uri.split(":/", 1)[1].strip("/")
    return Path(uri).name or uri


def sweep_champions(sweep: str, tracking_uri: str) -> list[str]:
    """``models:/NAME@champion`` for every registered model whose champion version was trained
    by the sweep ``sweep`` (its ``orch.sweep`` tag)."""
    from orchestrator import tracking

    try:
        client = tracking.client(tracking.require_store(tracking_uri))
    except FileNotFoundError as error:
        raise CompareError(str(error)) from None
    rows = tracking.registered_models(client)
    uris = [f"models:/{row['name']}@{tracking.CHAMPION}" for row in rows
            if row["sweep"] == sweep and tracking.CHAMPION in row["aliases"].split(",")]
    if not uris:
        sweeps = sorted({row["sweep"] for row in rows if tracking.CHAMPION in row["aliases"]})
        raise CompareError(f"no champion of sweep {sweep!r} in {tracking_uri}; sweeps with "
                           f"champions: {', '.join(sweeps) or 'none'} (see: orch models)")
    return uris


def load_entrants(uris: Sequence[str], *, tracking_uri: str | None,
                  transductions: Sequence[Transduction] = ()) -> list[Entrant]:
    """The models, each classifying queries one at a time, and beside each the same model with
    each of ``transductions`` and with the method it was validated with, if any: a
    transductive and an inductive entry for one model, on the same episodes."""
    if len(uris) < 1:
        raise CompareError("name at least one model (models:/NAME@ALIAS ...) or --sweep NAME")
    duplicates = sorted({uri for uri in uris if list(uris).count(uri) > 1})
    if duplicates:
        raise CompareError(f"{duplicates[0]} is named twice")
    entrants = []
    labels: dict[str, int] = {}
    for uri in uris:
        source = resolve(uri, tracking_uri=tracking_uri)
        model = load(source)
        label = label_of(uri)
        labels[label] = labels.get(label, 0) + 1
        if labels[label] > 1:  # two folders of the same name
            label = f"{label} ({labels[label]})"
        digest = model_digest(model)
        entrants.append(Entrant(label, uri, source, model.with_transduction(None), digest))
        methods = list(dict.fromkeys([*transductions, *(
            [model.transduction] if model.transduction is not None else [])]))
        for transduction in methods:
            named = f"{label} +{transduction.describe()}"
            try:
                entrants.append(Entrant(named, uri, source,
                                        model.with_transduction(transduction), digest))
            except TransductionError as error:
                entrants.append(Entrant(named, uri, source, model, digest, refused=str(error)))
    return entrants


@dataclass(frozen=True)
class Episodes:
    """What every model is scored on: the task families (one per ways and shots) of one data
    source, the split, seed and number of episodes."""

    kind: str  # "classification" or "regression"
    split: str
    tasks: int
    seed: int
    queries: int
    data: str | None  # image import (folder or URI); None for sampled (regression) families
    digest: str  # the data's identity, for the cache
    preprocessing: dict[str, Any] = field(default_factory=dict)
    convert: bool = False  # --convert: models of another treatment see the images converted
    converted: frozenset[str] = frozenset()  # labels of the models that see them converted

    def family(self, setting: Setting, reference: MetaModel) -> TaskFamily:
        if setting.episodes == "variable":
            return evaluation_family(reference, data=self.data, convert=self.convert,
                                     episodes="variable")
        return evaluation_family(reference, data=self.data, ways=setting.ways,
                                 shots=setting.shots, queries=self.queries, convert=self.convert,
                                 episodes="fixed" if self.kind == "classification" else None)


def check_comparable(entrants: Sequence[Entrant], *, data: str | os.PathLike[str] | None,
                     split: str, tasks: int, seed: int, queries: int | None,
                     convert: bool = False) -> Episodes:
    """The episodes every model is scored on; ``CompareError`` if the models cannot be compared
    on them (mixed regression and classification, other image sizes or channels without
    ``convert``, other task families)."""
    kinds = {entrant.model.classification for entrant in entrants}
    if len(kinds) > 1:
        regression = next(e for e in entrants if not e.model.classification)
        classification = next(e for e in entrants if e.model.classification)
        raise CompareError(f"{regression.label} does regression and {classification.label} "
                           "classifies images: compare them in separate calls")
    if tasks < 2:
        raise CompareError(f"--tasks must be at least 2 for an interval, got {tasks}")
    first = entrants[0].model
    if queries is None:  # one number for every model, or the episodes would differ
        queries = (DEFAULT_QUERIES if first.classification
                   else int(first.spec["sweep"]["data"]["queries"]))
    if not first.classification:
        if data is not None:
            raise CompareError("--data is for image models; regression tasks are sampled from "
                               "the family the models were trained on")
        if convert:
            raise CompareError("--convert is for image models; these models do regression")
        family = _without_shots(first.spec["sweep"]["data"])
        for entrant in entrants[1:]:
            other = _without_shots(entrant.model.spec["sweep"]["data"])
            if other != family:
                raise CompareError(f"{entrant.label} was trained on task family {other}, "
                                   f"{entrants[0].label} on {family}: not the same episodes")
        digest = json.dumps(family, sort_keys=True)
        return Episodes("regression", split, tasks, seed, queries, None, digest)
    from pipelines.episodes import EpisodeFamily

    recorded = first.spec["sweep"]["data"]["path"]
    if data is None and not isinstance(recorded, str):
        raise CompareError(f"{entrants[0].label} was trained on several imports; give --data "
                           "the one to compare on")
    path = str(data if data is not None else recorded)
    try:
        probe = EpisodeFamily(path, ways=2, shots=1, queries=1)
    except ValueError as error:  # DatasetError: no import there
        raise CompareError(first_line(error)) from None
    converted = set()
    for entrant in entrants:
        try:
            if needs_conversion(entrant.model, probe, entrant.model.spec.get("data_sources", []),
                                convert=convert):
                converted.add(entrant.label)
        except InferenceError as error:
            raise CompareError(f"{entrant.label}: {error}; or leave the model out") from None
    digest = probe.fingerprint_spec()["dataset"]
    return Episodes("classification", split, tasks, seed, queries, path, digest,
                    probe.preprocessing(), convert, frozenset(converted))


def _without_shots(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in ("shots", "queries", "eval_shots")}


# -- scoring ---------------------------------------------------------------------------------

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
    key = _cache_key(entrant, setting, episodes, steps)
    cached = _read_cache(cache, key)
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
    _write_cache(cache, key, entrant, setting, evaluation, timed_on)
    return Cell(entrant, setting, evaluation, cost=cost(model, evaluation, steps, timed_on))


def cost(model: MetaModel, evaluation: Evaluation, steps: int | None, timed_on: str) -> Cost:
    """What adapting cost ``model`` in ``evaluation`` (timed ``timed_on``); a sweep's cost
    objectives are this too (``orchestrator.objectives``)."""
    return Cost(warm_ms(evaluation.seconds), inner_steps(model, evaluation, steps),
                parameter_count(model), timed_on)


def _cache_key(entrant: Entrant, setting: Setting, episodes: Episodes, steps: int | None) -> str:
    what = {"model": entrant.digest, "setting": setting.key(), "split": episodes.split,
            "tasks": episodes.tasks, "seed": episodes.seed, "queries": episodes.queries,
            "data": episodes.digest, "steps": steps, "version": 2}
    if entrant.transduction is not None:
        what["transduction"] = entrant.transduction.as_knobs()
    if entrant.label in episodes.converted:
        what["converted"] = True
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def _read_cache(cache: Path | None, key: str) -> tuple[Evaluation, str] | None:
    """A cached evaluation, its per-episode times included, and where those were taken."""
    if cache is None or not (cache / f"{key}.json").is_file():
        return None
    try:
        stored = json.loads((cache / f"{key}.json").read_text())
        return Evaluation(**stored["evaluation"]), str(stored["timed_on"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a damaged entry is scored again and rewritten


def _write_cache(cache: Path | None, key: str, entrant: Entrant, setting: Setting,
                 evaluation: Evaluation, timed_on: str) -> None:
    if cache is None:
        return
    cache.mkdir(parents=True, exist_ok=True)
    record = {"model": entrant.uri, "setting": setting.name, "evaluation": asdict(evaluation),
              "timed_on": timed_on}
    with tempfile.NamedTemporaryFile("w", dir=cache, suffix=".tmp", delete=False) as handle:
        json.dump(record, handle)
    os.replace(handle.name, cache / f"{key}.json")


# -- the table ---------------------------------------------------------------------------------

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


# -- outputs -----------------------------------------------------------------------------------

def format_value(row: Row, percent: bool) -> str:
    if row.mean is None:
        return "refused"
    if percent:
        return f"{100 * row.mean:.2f} ± {100 * row.ci95:.2f}"
    return f"{row.mean:.4f} ± {row.ci95:.4f}"


def format_difference(row: Row, percent: bool) -> str:
    if row.mean is None:
        return "-"
    if row.best:
        return "best"
    scale, digits = (100, 2) if percent else (1, 4)
    mark = " *" if row.significant else ""
    return (f"{scale * row.diff_to_best:+.{digits}f} ± {scale * row.diff_ci95:.{digits}f}"
            f"{mark}")


def table_columns(comparison: Comparison) -> list[str]:
    percent = comparison.kind == "classification"
    columns = ["setting", "model", "accuracy (%)" if percent else "MSE",
               "vs best (paired)" + (" (points)" if percent else "")]
    if any(row.log_likelihood is not None for row in comparison.rows):
        columns += ["log-likelihood", "95% coverage"]
    return columns + ["ms/episode", "inner steps", "parameters"]


def table_cells(comparison: Comparison) -> list[list[str]]:
    """The table's rows as text: the terminal table and the Markdown file show the same."""
    percent = comparison.kind == "classification"
    uncertainty = any(row.log_likelihood is not None for row in comparison.rows)
    lines = []
    for row in comparison.rows:
        line = [row.setting.name, row.model, format_value(row, percent),
                format_difference(row, percent)]
        if uncertainty:
            line += ["-" if row.log_likelihood is None else
                     f"{row.log_likelihood:.3f} ± {row.log_likelihood_ci95:.3f}",
                     "-" if row.coverage95 is None else f"{100 * row.coverage95:.1f}%"]
        if row.adapt_ms is None:
            line += ["-", "-", "-"]
        else:
            line += [format_ms(row.adapt_ms), str(row.inner_steps), f"{row.parameters:,}"]
        lines.append(line)
    return lines


def format_ms(milliseconds: float) -> str:
    """Two decimals below 10 ms, one below 100 ms, none above: the digits timing can tell."""
    digits = 2 if milliseconds < 10 else 1 if milliseconds < 100 else 0
    return f"{milliseconds:.{digits}f}"


def markdown(comparison: Comparison, command: str | None = None) -> str:
    columns = table_columns(comparison)
    out = io.StringIO()
    if command:
        out.write(f"Made by: `{command}`\n\n")
    if comparison.data is not None:
        out.write(f"Episodes from: `{comparison.data}`\n\n")
    out.write("| " + " | ".join(columns) + " |\n")
    out.write("|" + "|".join(" --- " for _ in columns) + "|\n")
    for line in table_cells(comparison):
        out.write("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |\n")
    tasks = next((row.tasks for row in comparison.rows if row.tasks), None)
    out.write(f"\nMean over {tasks} episodes with its 95% interval (1.96 std / sqrt(episodes)); "
              "every model scored on the same episodes. \"vs best\": the mean per-episode "
              "difference to the setting's best model with its 95% interval; * where that "
              "interval excludes zero. \"ms/episode\": mean wall time to adapt to an episode's "
              "support set and predict its queries, after a warm-up episode, sampling excluded; "
              "\"inner steps\": gradient steps one adaptation takes (0: none); \"parameters\": "
              "meta-parameters.\n")
    for note in comparison.notes:
        out.write(f"\n- {note}")
    return out.getvalue().rstrip() + "\n"


def write_csv(comparison: Comparison, path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for record in comparison.records():
            writer.writerow({k: "" if v is None else v for k, v in record.items()})
    return path


def write_outputs(comparison: Comparison, out: Path, command: str | None = None) -> list[Path]:
    """compare.csv, compare.md and the plots, written into a staging folder first and moved
    into ``out`` together: an interrupted call leaves the previous files, not half of new ones."""
    from orchestrator.plots import comparison_curves

    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".compare-", dir=out))
    try:
        written = [write_csv(comparison, staging / "compare.csv")]
        (staging / "compare.md").write_text(markdown(comparison, command))
        written.append(staging / "compare.md")
        written += comparison_curves(comparison, staging)
        final = []
        for path in written:
            os.replace(path, out / path.name)
            final.append(out / path.name)
        return final
    finally:
        for leftover in staging.iterdir():
            leftover.unlink()
        staging.rmdir()


def run_folder(tracking_uri: str) -> Path:
    """The run folder of a local SQLite tracking store (where its artifacts live), else orch's
    default run folder."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///")).parent
    return Path(DEFAULT_RUN_DIR)


def log_to_mlflow(comparison: Comparison, files: Sequence[Path], *, tracking_uri: str,
                  params: dict[str, Any]) -> str:
    """One run of the experiment ``orch-compare``: the call as params, each model's mean and
    ms/episode per setting as metrics, the table and plots as artifacts. Returns the run id."""
    from orchestrator import tracking

    metrics = {_metric_name(f"{row.metric}/{row.setting.name}/{row.model}"): row.mean
               for row in comparison.rows if row.mean is not None}
    metrics.update({_metric_name(f"adapt_ms/{row.setting.name}/{row.model}"): row.adapt_ms
                    for row in comparison.rows if row.adapt_ms is not None})
    models = ",".join(sorted({r.uri for r in comparison.rows}))
    return tracking.log_finished_run(tracking_uri, EXPERIMENT, run_folder(tracking_uri),
                                     run_name="compare", kind="compare", metrics=metrics,
                                     params=params, tags={"orch.models": models}, files=files)


def _metric_name(text: str) -> str:
    """MLflow metric names allow letters, digits and ``_ - . / space``."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in text)
