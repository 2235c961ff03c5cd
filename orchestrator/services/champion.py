"""Which registered version holds a model's ``champion`` alias: the policy, apart from the
registry it is applied to (``tracking.register``).

A new version takes the alias only from a champion it can be weighed against: scored on the same
metric in the same direction, on the same task distribution (fingerprint), from the same
starting weights (``model.init``'s digest, empty for scratch) -- and only if it is better there.
Otherwise the alias stays and the version records why (``Decision.reason``), which ``orch
models`` shows.

Before orch tied a metric to its direction, a sweep could search ``val_accuracy`` downwards:
such a champion (its recorded direction contradicts its metric) is weighed by its metric's own
direction, so a version scored the right way can replace it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from orchestrator.config import OBJECTIVES


@dataclass(frozen=True)
class Score:
    """What a version was scored on, as its registry tags record it."""

    metric: str
    direction: str
    value: float
    fingerprint: str
    init_digest: str = ""

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> "Score":
        try:
            value = float(tags.get("orch.metric_value", "nan"))
        except ValueError:
            value = math.nan
        return cls(tags.get("orch.metric", ""), tags.get("orch.direction", ""), value,
                   tags.get("orch.task_fingerprint", ""), tags.get("orch.init.digest", ""))

    def describe(self) -> str:
        return f"{self.metric} ({self.direction})"


@dataclass(frozen=True)
class Decision:
    take: bool
    reason: str  # why the alias stays where it is (empty when the version takes it)


def decide(candidate: Score, champion: Score | None, champion_version: str = "") -> Decision:
    """Whether ``candidate`` takes the alias from ``champion`` (version ``champion_version``;
    None: there is no champion)."""
    natural = OBJECTIVES.get(candidate.metric)
    if natural is not None and candidate.direction != natural:
        return Decision(False, f"scored with {candidate.metric} {candidate.direction}d, which is "
                               f"{natural}d: never champion")
    if champion is None:
        return Decision(True, "")
    holder = f"champion v{champion_version}" if champion_version else "the champion"
    if champion.metric != candidate.metric:
        return Decision(False, f"scored on {candidate.describe()}, {holder} on "
                               f"{champion.describe()}: not comparable")
    direction = champion.direction
    if direction != candidate.direction and direction != OBJECTIVES.get(champion.metric):
        direction = candidate.direction  # a champion searched the wrong way: its metric's own
    if direction != candidate.direction:
        return Decision(False, f"scored on {candidate.describe()}, {holder} on "
                               f"{champion.describe()}: not comparable")
    if champion.fingerprint != candidate.fingerprint:
        return Decision(False, f"another task than {holder} (fingerprint {candidate.fingerprint}, "
                               f"its {champion.fingerprint})")
    if champion.init_digest != candidate.init_digest:
        return Decision(False, f"another starting point than {holder} (init "
                               f"{candidate.init_digest or 'scratch'}, its "
                               f"{champion.init_digest or 'scratch'})")
    if math.isnan(champion.value):  # a champion without a value is replaced
        return Decision(True, "")
    better = (candidate.value < champion.value if direction == "minimize"
              else candidate.value > champion.value)
    if better:
        return Decision(True, "")
    return Decision(False, f"{candidate.metric} {candidate.value:.4g} not better than {holder}'s "
                           f"{champion.value:.4g}")
