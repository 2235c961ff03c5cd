"""Using a trained meta-model: find it, read few-shot folders of images, predict, evaluate.

    from orchestrator import load_meta_model
    model = load_meta_model("models:/orch-protonet@champion")      # or runs:/RUN/model, a folder
    support, labels = read_support_folder("support")               # support/<class>/<image>.png
    prediction = model.predict(support, labels, read_query_folder("query"))
    prediction.labels, prediction.scores

``orch predict`` and ``orch evaluate`` (``model_cli``) are thin shells around this module. A
model is found from a registry URI (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``), a logged
model (``models:/m-...``), a run (``runs:/RUN_ID/model``) or a local folder (a saved meta-model,
or a downloaded MLflow model); ``tracking`` resolves the URIs in the tracking store.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from orchestrator.config import DEFAULT_TRACKING_URI, ImageData, SinusoidData
from orchestrator.errors import UserError
from orchestrator.config import URI_FORMS
from orchestrator.training.meta_model import MetaModel, ModelSource, Prediction
from pipelines.base import TaskFamily
from pipelines.preprocessing import IMAGE_SUFFIXES

if TYPE_CHECKING:
    from pipelines.episodes import EpisodeFamily


class InferenceError(UserError):
    """A model reference, folder or evaluation setting orch cannot use; the message is one line."""


# -- finding a model ----------------------------------------------------------------------------

def tracking_uri_or_default(tracking_uri: str | None) -> str:
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def resolve(uri: str, *, tracking_uri: str | None = None) -> ModelSource:
    """Where the model ``uri`` lives; a one-line ``UserError`` naming what is missing if it
    does not."""
    if not uri.startswith(("models:/", "runs:/")):
        if "://" in uri or uri.startswith(("models:", "runs:")):
            raise InferenceError(f"cannot read model URI {uri!r}; use {URI_FORMS}")
        if not Path(uri).exists():
            raise InferenceError(f"{uri}: no such model folder (a model is {URI_FORMS})")
        return ModelSource(uri, str(Path(uri).resolve()))
    from orchestrator.services import tracking  # MLflow is imported only where a store is read

    return tracking.resolve_model(uri, tracking_uri_or_default(tracking_uri))


def load(source: ModelSource) -> MetaModel:
    """The meta-model at ``source``, read into memory (artifacts are downloaded to a temporary
    folder that is removed again)."""
    if source.tracking_uri is None:
        return MetaModel.load(source.location)
    from orchestrator.services import tracking

    with tempfile.TemporaryDirectory(prefix="orch-model-") as folder:
        try:
            return MetaModel.load(tracking.download_model(source, folder))
        except FileNotFoundError:
            raise InferenceError(f"{source.uri}: not an orch model (no meta-model in "
                                 f"{source.location})") from None


def load_meta_model(uri: str | os.PathLike[str], *, tracking_uri: str | None = None) -> MetaModel:
    """The model at ``uri`` (a registry or run URI, or a local folder), ready to ``predict``.

    ``tracking_uri`` defaults to ``MLFLOW_TRACKING_URI``, else orch's ``sqlite:///orch-runs/mlflow.db``.
    """
    return load(resolve(str(uri), tracking_uri=tracking_uri))


# -- folders of images --------------------------------------------------------------------------

def image_files(folder: Path) -> list[Path]:
    """PNG/JPEG files directly in ``folder``, by name; hidden files and other files are skipped."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_SUFFIXES)


def read_support_folder(folder: str | os.PathLike[str]) -> tuple[list[Path], list[str]]:
    """Image paths and their class names from ``folder/<class>/<image>``: one sub-folder per
    class, named as the class, holding a few images each (at least two classes)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InferenceError(f"{folder}: no such support folder")
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        found = f"one ({classes[0].name})" if classes else "none"
        raise InferenceError(f"{folder}: a support set needs at least 2 classes, one sub-folder "
                             f"per class; found {found}")
    paths: list[Path] = []
    labels: list[str] = []
    for class_folder in classes:
        images = image_files(class_folder)
        if not images:
            raise InferenceError(f"{class_folder}: class folder holds no PNG/JPEG images")
        paths += images
        labels += [class_folder.name] * len(images)
    return paths, labels


def read_query_folder(folder: str | os.PathLike[str]) -> list[Path]:
    """The PNG/JPEG images directly in ``folder``, by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InferenceError(f"{folder}: no such query folder")
    images = image_files(folder)
    if not images:
        raise InferenceError(f"{folder}: query folder holds no PNG/JPEG images")
    return images


def predict_folders(model: MetaModel, support: str | os.PathLike[str],
                    query: str | os.PathLike[str], *, steps: int | None = None
                    ) -> tuple[list[Path], Prediction]:
    """Adapt ``model`` on the support folder and predict every image of the query folder."""
    if not model.classification:
        raise InferenceError(f"this {model.spec['algorithm']} model does regression; give the "
                             "support and query sets as CSV files of numbers, not folders")
    paths, labels = read_support_folder(support)
    queries = read_query_folder(query)
    return queries, model.predict(paths, labels, queries, steps=steps)


# -- CSV files of numbers (regression) -----------------------------------------------------------

def read_number_rows(path: str | os.PathLike[str], columns: int, what: str) -> list[list[float]]:
    """The rows of the CSV file ``path``, each of ``columns`` numbers; a first row that is not
    all numbers is a header and skipped."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise InferenceError(f"{path}: no such {what} file (a regression model reads CSV files)")
    with path.open(newline="") as handle:
        lines = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    rows = []
    for number, row in enumerate(lines, start=1):
        try:
            values = [float(cell) for cell in row]
        except ValueError:
            if number == 1:
                continue  # a header
            raise InferenceError(f"{path}, line {number}: not a row of numbers") from None
        if len(values) != columns:
            raise InferenceError(f"{path}, line {number}: {len(values)} columns, the {what} "
                                 f"rows of this model have {columns}")
        rows.append(values)
    if not rows:
        raise InferenceError(f"{path}: no rows of numbers")
    return rows


def predict_rows(model: MetaModel, support: str | os.PathLike[str],
                 query: str | os.PathLike[str], *, steps: int | None = None
                 ) -> tuple[list[list[float]], Prediction]:
    """Adapt a regression ``model`` on the support CSV file (each row: the input values, then
    the target values) and predict every row (input values) of the query CSV file."""
    if model.classification:
        raise InferenceError(f"this {model.spec['algorithm']} model classifies images; give the "
                             "support and query sets as folders of images")
    width = int(np.prod(model.spec["shape"]["input_shape"]))
    outputs = int(model.spec["shape"]["output_size"])
    support_rows = read_number_rows(support, width + outputs, "support")
    queries = read_number_rows(query, width, "query")
    prediction = model.predict([row[:width] for row in support_rows],
                               [row[width:] for row in support_rows], queries, steps=steps)
    return queries, prediction


# -- evaluation on episodes ---------------------------------------------------------------------

# The 97.5% quantile of the standard normal: mean +- Z95 std is a 95% predictive interval.
Z95 = 1.959963984540054


@dataclass(frozen=True)
class Evaluation:
    """Per-task scores of a model on ``len(per_task)`` tasks of one split.

    Regression models whose predictions carry a standard deviation (ALPaCA) are also scored by
    ``uncertainty``: per task, ``log_likelihood`` (mean over queries of the log predictive density
    of the target, summed over output dimensions) and ``coverage95`` (the fraction of query
    target values inside the 95% predictive interval, mean +- 1.96 std). ``seconds``: per task,
    the wall time of adapting to its support set and predicting its queries (sampling and
    scoring excluded), for ``orch compare``'s cost of adapting."""

    metric: str  # "accuracy" (classification) or "mse" (regression)
    per_task: list[float]
    split: str
    shots: int
    queries: int
    ways: int | None = None
    steps: int | None = None
    uncertainty: dict[str, list[float]] = field(default_factory=dict)
    # Where the episodes came from an import other than the model's training data: that import
    # (as given) and the first 12 hex digits of its content digest; and whether its images
    # were converted to the model's treatment (--convert).
    data: str | None = None
    data_id: str | None = None
    converted: bool = False
    # Wall seconds of each episode's adapt-and-predict call alone (``orch compare``'s cost).
    seconds: list[float] = field(default_factory=list)
    # "variable": Meta-Dataset-style episodes, whose ways, shots and queries are drawn per
    # episode (``ways`` is then None, ``shots`` and ``queries`` 0); "fixed" otherwise.
    episodes: str = "fixed"
    # Each episode's support set size (what adapting costs depends on it).
    support_sizes: list[int] = field(default_factory=list)
    # The transductive method the queries were classified with (``Transduction.describe``),
    # or None: one at a time.
    transduction: str | None = None
    # The imports the episodes came from (several for a model trained on a mix), and which
    # one each episode came from (an index into ``sources``).
    sources: list[str] = field(default_factory=list)
    source_of: list[int] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return float(np.mean(self.per_task))

    @property
    def ci95(self) -> float:
        """Half-width of the 95% interval of the mean: 1.96 sigma / sqrt(tasks)."""
        return interval95(self.per_task)

    def uncertainty_means(self) -> dict[str, tuple[float, float]]:
        """Each uncertainty score's (mean, 95% interval half-width) over tasks."""
        return {name: (float(np.mean(values)), interval95(values))
                for name, values in self.uncertainty.items()}

    def per_source(self) -> list[tuple[str, float, float, int]]:
        """Each source's (import, mean, 95% interval, episodes), as Meta-Dataset's tables
        report them; one row for episodes of one import."""
        if len(self.sources) < 2:
            return []
        rows = []
        for index, source in enumerate(self.sources):
            scores = [s for s, where in zip(self.per_task, self.source_of) if where == index]
            if scores:
                rows.append((source, float(np.mean(scores)), interval95(scores), len(scores)))
        return rows

    @property
    def source_average(self) -> float | None:
        """The mean of the sources' means (Meta-Dataset's average), for several sources."""
        rows = self.per_source()
        return float(np.mean([mean for _, mean, _, _ in rows])) if rows else None

    @property
    def setting(self) -> str:
        """``5way1shot`` (classification), ``10shot`` (regression) or ``variable`` (Meta-Dataset
        episodes), plus ``.3steps`` when the number of inner steps was overridden and the
        transductive method, ``.tim``, where one classified the queries."""
        if self.episodes == "variable":
            name = "variable"
        else:
            name = f"{self.ways}way{self.shots}shot" if self.ways else f"{self.shots}shot"
        name += f".{self.steps}steps" if self.steps is not None else ""
        return name + (f".{self.transduction_method}" if self.transduction else "")

    @property
    def transduction_method(self) -> str | None:
        """The transductive method's name (``transduction`` without its knobs)."""
        return self.transduction.partition("(")[0] if self.transduction else None

    def tags(self) -> dict[str, str]:
        """Model version tags: ``orch.eval.<split>.<setting>.<metric>``, ``.ci95`` and ``.tasks``
        (and ``.transductive``, the method with its knobs, where one classified the queries);
        on another import ``orch.eval.<data_id>.<split>.<setting>.*``, with ``.data`` (the
        import) and ``.converted``, so it never overwrites the in-domain figures."""
        prefix = (f"orch.eval.{self.split}.{self.setting}" if self.data_id is None
                  else f"orch.eval.{self.data_id}.{self.split}.{self.setting}")
        tags = {f"{prefix}.{self.metric}": repr(self.mean), f"{prefix}.ci95": repr(self.ci95),
                f"{prefix}.tasks": str(len(self.per_task))}
        if self.data_id is not None:
            tags[f"{prefix}.data"] = str(self.data)
            tags[f"{prefix}.converted"] = str(self.converted).lower()
        if self.transduction:
            tags[f"{prefix}.transductive"] = self.transduction  # with the knobs that differ
        for name, (mean, _) in self.uncertainty_means().items():
            tags[f"{prefix}.{name}"] = repr(mean)
        return tags


def interval95(values: Sequence[float]) -> float:
    """Half-width of the 95% interval of the mean of ``values``: Z95 (1.96) std / sqrt(n)."""
    return Z95 * float(np.std(values)) / math.sqrt(len(values))


def uncertainty_scores(mean: torch.Tensor, std: torch.Tensor,
                       targets: torch.Tensor) -> dict[str, float]:
    """One task's ``log_likelihood`` and ``coverage95`` (see ``Evaluation``)."""
    log_density = torch.distributions.Normal(mean, std).log_prob(targets)
    inside = (targets - mean).abs() <= Z95 * std
    return {"log_likelihood": float(log_density.sum(dim=-1).mean()),
            "coverage95": float(inside.float().mean())}


def evaluation_family(model: MetaModel, *, data: str | os.PathLike[str] | None = None,
                      ways: int | None = None, shots: int | None = None,
                      queries: int | None = None, convert: bool = False,
                      episodes: str | None = None) -> TaskFamily:
    """Tasks like the model's training tasks, with ``ways``, ``shots`` and ``queries`` overridden;
    ``episodes`` ``"variable"``: Meta-Dataset-style episodes instead (which draw their own ways,
    shots and queries), ``"fixed"``: N-way K-shot ones (default: as the model was trained).

    Image models read episodes from the import at ``data`` (a folder or a ``pyarrow.fs`` URI;
    default: the import or imports they were trained on, a mix taking its sources in turn). An
    import whose images the model did not see treated that way -- another size or channel count,
    other normalisation -- is refused in one line, unless ``convert``: then its images get the
    model's treatment (``pipelines.episodes.convert_pixels``). Regression models sample the
    family recorded in their spec and take no ``data``.
    """
    from orchestrator.training.factory import build_family

    recorded = model.spec["sweep"]["data"]
    if not model.classification:
        if data is not None:
            raise InferenceError(f"--data is for image models; this model's tasks "
                                 f"({recorded.get('family')}) are sampled, not read")
        if convert:
            raise InferenceError("--convert is for image models; this model does regression")
        if ways is not None:
            raise InferenceError("--ways is for classification; this model does regression")
        if episodes is not None:
            raise InferenceError("--episodes is for classification; this model does regression")
        section = SinusoidData.model_validate(recorded)
        return build_family(section.model_copy(update={
            "shots": shots or section.eval_shots or section.shots,
            "queries": queries or section.queries}))
    from pipelines.episodes import EpisodeFamily, MixedEpisodes
    from pipelines.variable_episodes import MAX_SUPPORT, MAX_WAYS, VariableEpisodes

    section = ImageData.model_validate(recorded)
    episodes = episodes or section.episodes
    if episodes == "variable":
        given = [name for name, value in (("--ways", ways), ("--shots", shots),
                                          ("--queries", queries)) if value is not None]
        if given:
            raise InferenceError(f"{given[0]} is for fixed N-way K-shot episodes; variable-way "
                                 "episodes draw their own ways, shots and queries")
        model.check_ways(MAX_WAYS, support=MAX_SUPPORT)
        make, options = VariableEpisodes, {}
    else:
        ways, shots = ways or section.ways, shots or section.shots
        model.check_ways(ways, support=ways * shots)
        make = EpisodeFamily
        options = dict(ways=ways, shots=shots, queries=queries or section.queries)
    records = model.spec.get("data_sources") or []
    paths = section.paths() if data is None else [str(data)]
    sources = []
    try:
        for index, path in enumerate(paths):
            source = make(path, **options)
            # Its own training import must still hold what the model saw; any other import
            # must hold what the model saw of one of its training imports.
            trained = ([records[index]] if data is None and len(records) == len(paths)
                       else records)
            if needs_conversion(model, source, trained, convert=convert):
                source = make(path, convert_to=model.spec["preprocessing"], **options)
            sources.append(source)
    except ValueError as error:  # DatasetError is one; so is ways < 2
        raise InferenceError(str(error)) from None
    if len(sources) == 1:
        return sources[0]
    weights = section.sampling_weights()
    if weights == "classes":
        weights = [float(source.class_count(section.train_split)) for source in sources]
    return MixedEpisodes(sources, weights=weights, draw_splits=(section.train_split,))


def needs_conversion(model: MetaModel, source: EpisodeFamily, trained: Sequence[dict] = (), *,
                     convert: bool) -> bool:
    """Whether ``source``'s images must be converted for ``model``: False where it holds them as
    the model saw its training images (``trained``: the model's ``data_sources`` records that
    count; none: its preprocessing); True where they differ and ``convert`` allows it; else an
    ``InferenceError`` naming both shapes (or both treatments, where the shapes agree)."""
    treatment = source.preprocessing()
    seen = [record["preprocessing"] for record in trained] or [model.spec["preprocessing"]]
    if treatment in seen:
        return False
    if convert:
        return True
    from pipelines.episodes import describe_shape

    shape, expected = source.input_shape(), tuple(model.spec["shape"]["input_shape"])
    if tuple(shape) != expected:
        raise InferenceError(f"{source.where} holds {describe_shape(shape)} images but the model "
                             f"was trained on {describe_shape(expected)}; pass --convert to resize "
                             "them and convert their channels as the model's training images were "
                             "treated, or import the data at the model's size")
    raise InferenceError(f"{source.where}: imported with preprocessing {treatment}, but the model "
                         f"was trained on {seen[0]}; import the data again with the model's "
                         "settings (e.g. --size), or pass --convert to give its images the "
                         "model's treatment")


def evaluate(model: MetaModel, family: TaskFamily, *, split: str = "test", tasks: int = 600,
             seed: int = 0, steps: int | None = None,
             on_task: Callable[[int], None] | None = None,
             transform_queries: Callable[[int, torch.Tensor], torch.Tensor] | None = None
             ) -> Evaluation:
    """Adapt to ``tasks`` tasks of ``split`` (task ``i`` is the family's ``(split, seed, i)``)
    and score each one's queries: accuracy, or mean squared error for regression (and, for
    models with predictive uncertainty, the queries' log-likelihood and 95%-interval coverage).
    ``transform_queries(i, query_x)`` distorts task ``i``'s query inputs (``orch compare
    --shift``); the support set is left as drawn."""
    if tasks < 1:
        raise InferenceError(f"--tasks must be at least 1, got {tasks}")
    if not type(model.learner).uses_inner_steps:
        steps = None  # nothing to override: the result is the same as without it
    ways = family.ways
    scores: list[float] = []
    uncertainty: dict[str, list[float]] = {}
    seconds: list[float] = []
    supports: list[int] = []
    sources = family.sources() if hasattr(family, "sources") else []
    source_of: list[int] = []
    for index in range(tasks):
        try:
            task = family.task(split, seed, index)
        except ValueError as error:  # an unknown split, or too few classes or images in it
            raise InferenceError(str(error)) from None
        supports.append(len(task.support_y))
        if len(sources) > 1:
            source_of.append(family.source_of(split, seed, index))
        query_x = task.query_x
        if transform_queries is not None:
            query_x = transform_queries(index, query_x)
        started = time.perf_counter()
        outputs, std = model.adapt_and_predict_with_std(task.support_x, task.support_y,
                                                        query_x, steps=steps)
        seconds.append(time.perf_counter() - started)
        if model.classification:
            correct = outputs.argmax(dim=-1) == task.query_y
            scores.append(float(correct.float().mean()))
        else:
            scores.append(float(torch.nn.functional.mse_loss(outputs, task.query_y)))
            if std is not None:
                for name, value in uncertainty_scores(outputs, std, task.query_y).items():
                    uncertainty.setdefault(name, []).append(value)
        if on_task is not None:
            on_task(index + 1)
    variable = not family.fixed_shape
    shots = 0 if variable else len(task.support_y) // (ways or 1)
    queries = 0 if variable else len(task.query_y) // (ways or 1)
    data, data_id = other_import(model, family) or (None, None)
    transduction = model.transduction.describe() if model.transduction is not None else None
    return Evaluation("accuracy" if model.classification else "mse", scores, split, shots,
                      queries, ways, steps, uncertainty, data, data_id,
                      bool(getattr(family, "converted", False)), seconds,
                      "variable" if variable else "fixed", supports, transduction,
                      [source.path for source in sources] if len(sources) > 1 else [],
                      source_of)


def other_import(model: MetaModel, family: TaskFamily) -> tuple[str, str] | None:
    """(the import as given, its digest's first 12 hex digits) where ``family`` reads one import
    that is not among the model's training imports (by content), else None."""
    sources = family.sources() if hasattr(family, "sources") else []
    if len(sources) != 1:
        return None  # sampled tasks, or the model's own mix
    source = sources[0]
    digest = source.fingerprint_spec()["dataset"]
    records = model.spec.get("data_sources")
    if records is not None:
        if digest in {record["dataset"] for record in records}:
            return None
    elif source.path == str(model.spec["sweep"]["data"].get("path")):
        return None  # a model saved before data_sources were recorded: known by its path
    return source.path, digest[:12]


def record_evaluation(source: ModelSource, evaluation: Evaluation) -> bool:
    """Tag the registered model version ``source`` names with the evaluation; False when the
    model is not a registered version (a run, a logged model or a folder)."""
    if source.name is None or source.version is None or source.tracking_uri is None:
        return False
    from orchestrator.services import tracking

    tracking.tag_model_version(source, evaluation.tags())
    return True
