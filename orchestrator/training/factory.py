"""Building learners and task families from a sweep's sections: the one factory that training
(``training.py``) and serving (``meta_model.py``, ``inference.py``) share, so that a saved model
is rebuilt exactly as it was trained, without the serving side importing the training loop.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from learners.backbones import build_backbone
from learners.base import Learner, Objective
from learners.registry import learner_class
from orchestrator.config import ImageData, ModelSection, SinusoidData
from pipelines.base import TaskFamily
from pipelines.sinusoid import Sinusoid


def build_family(data: SinusoidData | ImageData) -> TaskFamily:
    if isinstance(data, SinusoidData):
        return Sinusoid(shots=data.shots, queries=data.queries)
    # Imported lazily: pyarrow is only needed here.
    from pipelines.episodes import EpisodeFamily, episode_family
    from pipelines.variable_episodes import VariableEpisodes

    if data.episodes == "variable":
        kind, shape = VariableEpisodes, {}
    else:
        kind, shape = EpisodeFamily, {"ways": data.ways, "shots": data.shots,
                                      "queries": data.queries}
    family = episode_family(data.path, weights=data.sampling_weights(),
                            draw_splits=(data.train_split,), kind=kind,
                            image_size=data.image_size, **shape,
                            rotate_splits=(data.train_split,) if data.augment_rotations else ())
    family.check_splits((data.train_split, data.val_split), data.shots)
    return family


def split_names(data: SinusoidData | ImageData) -> tuple[str, str]:
    """(meta-train split, validation split)."""
    if isinstance(data, ImageData):
        return data.train_split, data.val_split
    return "train", "val"


def learner_hparams(algorithm: str, knobs: Mapping[str, Any]) -> dict[str, Any]:
    hparams = learner_class(algorithm).Hyperparameters.model_fields
    return {k: v for k, v in knobs.items() if k in hparams}


def build_learner(model: ModelSection, algorithm: str, knobs: Mapping[str, Any], *,
                  kind: str, input_shape: Sequence[int], output_size: int,
                  ways: int | None = None, classes: int | None = None,
                  inner_checkpointing: int | None = None) -> Learner:
    """The learner ``algorithm`` with resolved ``knobs`` for tasks of this shape. Takes shapes,
    not a task family, so a saved model can be rebuilt where its training data is absent.
    ``ways`` (the trained number of classes, kept in a model's spec) is not handed to the learner:
    each task says how many classes it has, and a fixed output head is ``output_size`` wide.
    ``classes`` is the training split's number of classes (``TaskFamily.class_count``), which
    pretraining learners classify over; only their initial weights need it.
    ``inner_checkpointing`` (``training.inner_checkpointing``, for the meta-gradient of the
    learners that support it) is refused for the others, as the sweep file is."""
    cls = learner_class(algorithm)
    hparams = cls.Hyperparameters.model_validate(learner_hparams(algorithm, knobs))
    head = output_size if getattr(cls, "needs_head", True) else None
    backbone = build_backbone(model.backbone, input_shape, head, hidden=model.hidden,
                              filters=model.filters)
    learner = cls(backbone, Objective.for_task_kind(kind), hparams)
    learner.output_size = output_size
    learner.classes = classes
    if inner_checkpointing is not None:
        if cls.inner_checkpointing_refusal is not None:
            raise ValueError(f"inner checkpointing: {algorithm} {cls.inner_checkpointing_refusal}")
        learner.inner_checkpointing = inner_checkpointing
    return learner


def task_shape(family: TaskFamily) -> dict[str, Any]:
    """What ``build_learner`` needs to know about a family's tasks."""
    return {"kind": family.kind, "input_shape": list(family.input_shape()),
            "output_size": family.output_size(), "ways": family.ways}
