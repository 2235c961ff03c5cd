"""What ``orch compare`` compares: the models taking part (``Entrant``), the settings they are
scored in (``Setting``: N-way K-shot, shifted, or variable-way episodes), the episodes shared by
all of them (``Episodes``), and what cannot be compared at all, refused before anything is scored
(``check_comparable``)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from learners.transduction import Transduction, TransductionError
from orchestrator.errors import UserError, first_line
from orchestrator.models.inference import (InferenceError, ModelSource, evaluation_family, load,
                                           needs_conversion, resolve)
from orchestrator.training.meta_model import MetaModel
from pipelines.base import TaskFamily


DEFAULT_QUERIES = 15  # query images per class at test, as in the papers' protocols


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
    from orchestrator.services import tracking

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
