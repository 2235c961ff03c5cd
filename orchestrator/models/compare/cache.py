"""Results already scored, as JSON files under the run folder, keyed by the model's content
(weights and spec), the setting, the episodes and the inner steps: a rerun with one more model
scores only that model, and a new version of a model is scored anew."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

from orchestrator.models.compare.settings import Entrant, Episodes, Setting
from orchestrator.models.inference import Evaluation


def cache_key(entrant: Entrant, setting: Setting, episodes: Episodes, steps: int | None) -> str:
    what = {"model": entrant.digest, "setting": setting.key(), "split": episodes.split,
            "tasks": episodes.tasks, "seed": episodes.seed, "queries": episodes.queries,
            "data": episodes.digest, "steps": steps, "version": 2}
    if entrant.transduction is not None:
        what["transduction"] = entrant.transduction.as_knobs()
    if entrant.label in episodes.converted:
        what["converted"] = True
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def read_cached(cache: Path | None, key: str) -> tuple[Evaluation, str] | None:
    """A cached evaluation, its per-episode times included, and where those were taken."""
    if cache is None or not (cache / f"{key}.json").is_file():
        return None
    try:
        stored = json.loads((cache / f"{key}.json").read_text())
        return Evaluation(**stored["evaluation"]), str(stored["timed_on"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a damaged entry is scored again and rewritten


def write_cached(cache: Path | None, key: str, entrant: Entrant, setting: Setting,
                 evaluation: Evaluation, timed_on: str) -> None:
    if cache is None:
        return
    cache.mkdir(parents=True, exist_ok=True)
    record = {"model": entrant.uri, "setting": setting.name, "evaluation": asdict(evaluation),
              "timed_on": timed_on}
    with tempfile.NamedTemporaryFile("w", dir=cache, suffix=".tmp", delete=False) as handle:
        json.dump(record, handle)
    os.replace(handle.name, cache / f"{key}.json")
