"""Which transductive method runs, with which knobs, on which learner (the maths is in
``learners/transductive.py``).

A ``Transduction`` is a method and its knobs. It is named the same way everywhere: in a sweep
file as algorithm knobs (``transductive: tim`` and ``tim_lr: {low: ..., high: ...}``, so Optuna
can tune them and the sweep validates transductively), on the command line as
``--transductive tim`` or ``tim:lr=0.001,iterations=200``, and in a saved model's knobs, which
``orch evaluate``, ``orch predict`` and the served model then apply by default.

It runs on the learners whose adaptation compares fixed embeddings of the inputs
(``Learner.embeds``: ProtoNet, MetaOptNet and the pretrained Baseline, Baseline++ and
SimpleShot). The others adapt the network itself (the gradient family), read the support set
through a learned module (Matching's full-context embeddings, Relation's relation module) or
have no embedding at all (SNAIL, MetaNet): refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

from learners import transductive
from learners.base import Learner, Params, task_ways

# The sweep-file knob that picks the method ("none": inductive, the default).
METHOD_KNOB = "transductive"
NONE = "none"


class TransductionError(ValueError):
    """A transductive method that cannot run on this learner or input; one line."""


class Knobs(BaseModel):
    """One method's knobs; defaults are the papers' (each field says where it comes from)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def gradient_steps(self) -> int:
        """Gradient steps one run takes (``orch compare``'s cost column); 0 for the methods
        that iterate without gradients (bound updates, Sinkhorn, a closed form)."""
        return 0


class TIMKnobs(Knobs):
    iterations: int = Field(1000, ge=1, le=100000, description="Adam steps (the TIM-GD "
                            "evaluation scripts: 1000)")
    lr: float = Field(1e-4, gt=0, description="Adam's rate (1e-4)")
    temperature: float = Field(15.0, gt=0, description="logit scale (15)")
    ce_weight: float = Field(0.1, ge=0, description="support cross-entropy weight (0.1)")
    marginal_weight: float = Field(1.0, ge=0, description="weight of the queries' marginal "
                                   "label entropy, maximised (1)")
    conditional_weight: float = Field(0.1, ge=0, description="weight of the queries' "
                                      "conditional entropy, minimised (0.1)")

    def gradient_steps(self) -> int:
        return self.iterations


class BDCSPNKnobs(Knobs):
    epsilon: float = Field(10.0, gt=0, description="cosine scale of the prototype weights and "
                           "of the logits (Liu et al. 2020: 10)")
    top: int | None = Field(None, ge=1, description="pseudo-labelled queries per class that join "
                            "its prototype, the most similar first (the paper's Z); default "
                            "every one, as the LaplacianShot authors' and easyfsl's code")
    shift: bool = Field(True, description="shift the queries by the support-query mean "
                        "difference (the cross-class correction)")


class LaplacianShotKnobs(Knobs):
    lam: float = Field(1.0, ge=0, description="weight of the Laplacian term (the authors' "
                       "scripts start at 1 and tune it on validation episodes)")
    knn: int = Field(3, ge=2, le=100, description="neighbours of each query, itself counted, "
                     "as the authors' affinity (3)")
    iterations: int = Field(20, ge=1, le=1000, description="bound updates at most (20)")
    rectify: bool = Field(True, description="rectify the prototypes as BD-CSPN (the authors' "
                          "evaluation does)")


class PTMAPKnobs(Knobs):
    beta: float = Field(0.5, gt=0, le=10, description="power transform exponent (Hu et al. "
                        "2021: 0.5)")
    lam: float = Field(10.0, gt=0, description="Sinkhorn's inverse temperature (10)")
    alpha: float = Field(0.2, gt=0, le=1, description="centre update rate (0.2)")
    iterations: int = Field(20, ge=0, le=1000, description="centre updates (20)")


@dataclass(frozen=True)
class Method:
    """A transductive method: its knobs and its function of an episode's features."""

    name: str
    title: str  # as the tables say it
    Knobs: type[Knobs]
    run: Callable[..., transductive.Transduced]
    centred: bool = False  # it takes the training features' mean (``Learner.feature_mean``)

    def on_features(self, support: Tensor, support_y: Tensor, query: Tensor, ways: int,
                    knobs: Knobs, *, centre: Tensor | None = None) -> transductive.Transduced:
        """The method on embeddings already computed (benchmarks/transductive.py batches
        episodes this way); ``centre``: the learner's training feature mean, if any."""
        extra = {"centre": centre} if self.centred else {}
        return self.run(support, support_y, query, ways, **extra, **knobs.model_dump())


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("tim", "TIM-GD", TIMKnobs, transductive.tim),
    Method("bdcspn", "BD-CSPN", BDCSPNKnobs, transductive.bdcspn),
    Method("laplacianshot", "LaplacianShot", LaplacianShotKnobs, transductive.laplacianshot,
           centred=True),
    Method("ptmap", "PT-MAP", PTMAPKnobs, transductive.ptmap),
)}


def method_knobs() -> dict[str, tuple[str, str]]:
    """Every sweep-file knob of every method: ``<method>_<knob>`` -> (method, knob)."""
    return {f"{name}_{field}": (name, field) for name, method in METHODS.items()
            for field in method.Knobs.model_fields}


@dataclass(frozen=True)
class Transduction:
    """A method and its resolved knobs."""

    method: str
    knobs: Knobs

    SYNTAX: ClassVar[str] = ("METHOD or METHOD:KNOB=VALUE,...; methods: "
                             + ", ".join(METHODS))

    @classmethod
    def of(cls, method: str, knobs: Mapping[str, Any] | None = None) -> "Transduction":
        if method not in METHODS:
            raise TransductionError(f"unknown transductive method {method!r}; allowed: "
                                    f"{', '.join(METHODS)} (or none)")
        model = METHODS[method].Knobs
        try:
            return cls(method, model.model_validate(dict(knobs or {})))
        except ValidationError as error:
            problem = error.errors()[0]
            knob = ".".join(str(p) for p in problem["loc"])
            allowed = ", ".join(model.model_fields)
            detail = ("unknown knob; allowed: " + allowed if problem["type"] == "extra_forbidden"
                      else f"{problem['msg']} (got {problem.get('input')!r})")
            raise TransductionError(f"{method} {knob}: {detail}") from None

    @classmethod
    def parse(cls, text: str) -> "Transduction | None":
        """``tim``, ``tim:lr=0.001,iterations=200`` or ``none`` (None)."""
        method, _, rest = text.strip().partition(":")
        if method == NONE and not rest:
            return None
        knobs: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            name, equals, value = item.partition("=")
            if not equals or not name.strip():
                raise TransductionError(f"cannot read {item!r} in {text!r}; use {cls.SYNTAX}")
            knobs[name.strip()] = value.strip()
        return cls.of(method, {k: _value(v) for k, v in knobs.items()})

    @classmethod
    def from_knobs(cls, knobs: Mapping[str, Any]) -> "Transduction | None":
        """The transduction a sweep's resolved knobs (or a saved model's) ask for, or None."""
        method = knobs.get(METHOD_KNOB, NONE)
        if method in (None, NONE):
            return None
        prefix = f"{method}_"
        return cls.of(method, {k.removeprefix(prefix): v for k, v in knobs.items()
                               if k.startswith(prefix) and k in method_knobs()})

    def as_knobs(self) -> dict[str, Any]:
        """The sweep-file form: ``{transductive: tim, tim_lr: ...}``."""
        return {METHOD_KNOB: self.method,
                **{f"{self.method}_{k}": v for k, v in self.knobs.model_dump().items()}}

    @property
    def title(self) -> str:
        return METHODS[self.method].title

    def describe(self) -> str:
        """``tim`` with the knobs that differ from the paper's: ``tim(iterations=200)``."""
        defaults = METHODS[self.method].Knobs()
        changed = {k: v for k, v in self.knobs.model_dump().items()
                   if getattr(defaults, k) != v}
        if not changed:
            return self.method
        return f"{self.method}({', '.join(f'{k}={v}' for k, v in changed.items())})"

    def gradient_steps(self) -> int:
        return self.knobs.gradient_steps()


def _value(text: str) -> Any:
    """A command-line knob value: a number, true/false, none, or the text itself (pydantic
    validates it against the knob's type)."""
    lowered = text.lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def embedding_learners() -> list[str]:
    """The algorithms transduction runs on, for messages."""
    from learners.registry import LEARNERS  # the registry imports every learner

    return [name for name, cls in LEARNERS.items() if cls.embeds]


def check_learner(cls: type[Learner]) -> None:
    """Refuse, in one line, a learner whose adaptation has no embedding to work on."""
    if not cls.embeds:
        why = NO_EMBEDDING.get(cls.family, "its adaptation reads the support set through a "
                                           "learned module")
        raise TransductionError(
            f"{cls.name} has no embedding for transductive inference to work on ({cls.family} "
            f"learner: {why}); transductive methods run on {', '.join(embedding_learners())}")


# Why a family's learners have no fixed embedding (the others read the support set through a
# learned module: Matching's full-context embeddings, Relation's relation module, Siamese's
# learned distance, ALPaCA's posterior).
NO_EMBEDDING = {
    "gradient": "it adapts the network's weights themselves",
    "model-based": "it reads the episode as a sequence or generates weights, with no fixed "
                   "embedding",
}


def transductive_outputs(learner: Learner, params: Params, support_x: Tensor,
                         support_y: Tensor, query_x: Tensor, transduction: Transduction, *,
                         ways: int | None = None) -> Tensor:
    """The queries' log-probabilities under ``transduction`` after adapting to the support set:
    what evaluation, validation, ``orch predict`` and the served model use in place of
    ``Learner.adapted_outputs``. Refuses, in one line, a learner without embeddings, a single
    query (the method needs the query set) and a support set of one class."""
    check_learner(type(learner))
    if len(query_x) < 2:
        raise TransductionError(f"{transduction.method} is transductive: it classifies the whole "
                                f"query set together and needs at least 2 queries, got "
                                f"{len(query_x)}")
    ways = ways if ways is not None else task_ways(support_y)
    if ways < 2 or len(torch.unique(support_y)) < 2:
        raise TransductionError(f"{transduction.method} needs a support set of at least 2 "
                                "classes, got 1")
    support, query = learner.embedding(params, support_x), learner.embedding(params, query_x)
    return METHODS[transduction.method].on_features(
        support, support_y, query, ways, transduction.knobs,
        centre=learner.feature_mean(params)).log_probs


def transductive_statistics(learner: Learner, params: Params, tasks, transduction: Transduction
                            ) -> dict[str, float]:
    """Summed query statistics (loss: the negative log-likelihood of the transductive
    posterior; accuracy) over ``tasks`` (a ``TaskBatch`` or ``TaskList``): what a sweep's
    validation reports when the sweep file asks for transduction."""
    params = {k: v.detach() for k, v in params.items()}
    total: dict[str, float] = {}
    with torch.no_grad():
        for i in range(len(tasks)):
            task = tasks[i]
            outputs = transductive_outputs(learner, params, task.support_x, task.support_y,
                                           task.query_x, transduction)
            loss = learner.objective.loss(outputs, task.query_y)
            stats = learner.summed_statistics(outputs.unsqueeze(0), task.query_y.unsqueeze(0),
                                              loss.reshape(1))
            for key, value in stats.items():
                total[key] = total.get(key, 0.0) + value
    return total
