"""What a trial is scored on: its validation metrics and, where the sweep asks for them, what
adapting costs its model.

``search.metric`` may name costs beside a validation metric (``val_loss``, ``val_accuracy``):
``adapt_ms`` (wall milliseconds to adapt to one episode and predict its queries), ``inner_steps``
(gradient steps one adaptation takes) and ``parameters`` (the meta-parameters' count). They are
measured here exactly as ``orch compare`` measures them -- its ``inference.evaluate`` timing and
its ``scoring.cost`` -- on the trial's finished model, on ``training.eval_tasks`` episodes of
the validation split in the sweep's own setting (ways, shots -- ``eval_shots`` for sinusoid --
and queries), seeded by ``training.seed``: ``orch compare MODEL --split val --tasks N --seed S
--ways W --shots K --queries Q`` times the same episodes the same way, in its own process and
threads. Costs are measured once a trial completes (a pruned trial has no model).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from orchestrator.models.compare import scoring
from orchestrator.config import OBJECTIVES, VALIDATION_METRICS, Sweep
from orchestrator.training.factory import split_names
from orchestrator.models.inference import evaluate, evaluation_family
from orchestrator.training.meta_model import MetaModel

COSTS = tuple(name for name in OBJECTIVES if name not in VALIDATION_METRICS)


def costs_asked(sweep: Sweep) -> list[str]:
    """The costs among the sweep's objectives, in its order."""
    return [name for name in sweep.search.objectives if name in COSTS]


def measure_costs(model: MetaModel, sweep: Sweep) -> tuple[dict[str, float], str]:
    """``adapt_ms``, ``inner_steps`` and ``parameters`` of ``model`` (see the module's
    docstring), and where the milliseconds were timed (``scoring.timing_context``)."""
    family = evaluation_family(model)  # the sweep's ways, shots (eval_shots) and queries
    _, val_split = split_names(sweep.data)
    # At least two episodes: the first is a warm-up that orch compare leaves out of the mean.
    evaluation = evaluate(model, family, split=val_split, tasks=max(2, sweep.training.eval_tasks),
                          seed=sweep.training.seed)
    timed_on = scoring.timing_context()
    cost = scoring.cost(model, evaluation, None, timed_on)
    return {"adapt_ms": cost.adapt_ms, "inner_steps": float(cost.inner_steps),
            "parameters": float(cost.parameters)}, timed_on


def values(objectives: Sequence[str], metrics: Mapping[str, float],
           costs: Mapping[str, float]) -> list[float]:
    """The trial's value of each objective, in order, from its final validation ``metrics``
    and its measured ``costs``."""
    return [float(costs[name] if name in COSTS else metrics[name]) for name in objectives]
