"""A trained meta-model on disk: its weights and everything needed to rebuild and use it.

The folder holds ``weights.pt`` (a plain tensor dict, loaded with ``weights_only=True``) and
``spec.json`` (algorithm, resolved knobs, model and data sections of the sweep, the data's
preprocessing, each import's path, digest and preprocessing in ``data_sources``, and the task
fingerprint). MLflow stores this folder as the artifact of its pyfunc model, and ``orch
predict``, ``orch evaluate`` and notebooks all use it through ``MetaModel``.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import Tensor

from learners.base import Learner, Params
from learners.transduction import (Transduction, TransductionError, check_learner,
                                   transductive_outputs)
from orchestrator.config import ModelSection, sweep_from_dict
from orchestrator.training.factory import build_family, build_learner, task_shape

if TYPE_CHECKING:
    import pandas
    from PIL.Image import Image

WEIGHTS = "weights.pt"
SPEC = "spec.json"
# The pyfunc model's artifact key, and so the folder of the meta-model inside an MLflow model.
PYFUNC_ARTIFACT = "meta_model"

# A batch tensor, or a sequence of tensors, PIL images or image paths; numbers for regression.
Inputs = Tensor | Sequence[Any]


@dataclass(frozen=True)
class ModelSource:
    """Where a model URI points: an artifact location (or local folder) and, for registry URIs,
    the registered model version it names (``tracking.resolve_model``); ``run_id``: the MLflow
    run that logged it, where known."""

    uri: str
    location: str
    tracking_uri: str | None = None
    name: str | None = None
    version: str | None = None
    run_id: str | None = None


@dataclass
class Prediction:
    """Outputs for the query inputs: values (regression) or class names with scores; ``std``
    is the predictive standard deviation beside the values, for regression learners whose
    predictions carry one (ALPaCA), else None."""

    outputs: Tensor
    classes: list[str] | None = None
    std: Tensor | None = None

    @property
    def labels(self) -> list[str] | None:
        if self.classes is None:
            return None
        return [self.classes[i] for i in self.outputs.argmax(dim=-1).tolist()]

    @property
    def scores(self) -> Tensor:
        return torch.softmax(self.outputs, dim=-1) if self.classes is not None else self.outputs


class MetaModel:
    """A learner with trained meta-parameters, ready to adapt to new tasks."""

    def __init__(self, learner: Learner, params: Params, spec: dict[str, Any]):
        self.learner = learner
        self.params = params
        self.spec = spec
        # How queries are classified: one at a time (None), or together by a transductive
        # method; by default the one the model was validated with (its ``transductive`` knob).
        self.transduction: Transduction | None = Transduction.from_knobs(spec.get("knobs", {}))

    def with_transduction(self, transduction: Transduction | None) -> "MetaModel":
        """This model classifying queries by ``transduction`` (None: one at a time), sharing its
        learner and weights; refused in one line for learners without embeddings."""
        if transduction is not None:
            check_learner(type(self.learner))
        other = copy.copy(self)
        other.transduction = transduction
        return other

    @classmethod
    def build(cls, sweep_dict: dict[str, Any], algorithm: str, knobs: Mapping[str, Any],
              params: Params, **extra: Any) -> "MetaModel":
        sweep = sweep_from_dict(sweep_dict)
        family = build_family(sweep.data)
        shape = task_shape(family)
        learner = build_learner(sweep.model, algorithm, knobs, **shape)
        spec = {"algorithm": algorithm, "knobs": dict(knobs), "shape": shape,
                "sweep": {"name": sweep.name, "data": sweep.data.model_dump(mode="json"),
                          "model": sweep.model.model_dump(mode="json")},
                "preprocessing": family.preprocessing(),
                "task_fingerprint": sweep.task_fingerprint(), **extra}
        if hasattr(family, "sources"):  # image imports: each one's path, digest and treatment
            spec["data_sources"] = [source.source_record() for source in family.sources()]
        return cls(learner, {k: v.detach().cpu() for k, v in params.items()}, spec)

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> "MetaModel":
        """Read a saved model folder, or the one inside a downloaded MLflow pyfunc model."""
        folder = find_model_folder(Path(folder))
        spec = json.loads((folder / SPEC).read_text())
        params = torch.load(folder / WEIGHTS, weights_only=True, map_location="cpu")
        model = ModelSection.model_validate(spec["sweep"]["model"])
        learner = build_learner(model, spec["algorithm"], spec["knobs"], **spec["shape"])
        return cls(learner, params, spec)

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write the model folder atomically: a crash never leaves a half-written model."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        torch.save(self.params, staging / WEIGHTS)
        (staging / SPEC).write_text(json.dumps(self.spec, indent=2, sort_keys=True))
        os.replace(staging, folder)
        return folder

    @property
    def classification(self) -> bool:
        return self.spec["shape"]["kind"] == "classification"

    def adapt_and_predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *,
                          steps: int | None = None) -> Tensor:
        """Query outputs after adapting to the support set; for classification, logits over
        exactly the support set's classes (a fixed head trained on more is cut to them)."""
        return self.adapt_and_predict_with_std(support_x, support_y, query_x, steps=steps)[0]

    def adapt_and_predict_with_std(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                                   *, steps: int | None = None) -> tuple[Tensor, Tensor | None]:
        """``adapt_and_predict`` and the predictive standard deviation of each output (None
        for learners without uncertainty)."""
        if self.transduction is not None:
            outputs = transductive_outputs(self.learner, self.params, support_x, support_y,
                                           query_x, self.transduction)
            return outputs, None
        with torch.no_grad():
            outputs, std = self.learner.adapted_prediction(self.params, support_x, support_y,
                                                           query_x, steps=steps)
        if self.classification:
            ways = self.learner.ways_of(support_y)
            if outputs.shape[-1] < ways:
                raise RuntimeError(f"{self.spec['algorithm']} returned {outputs.shape[-1]} class "
                                   f"scores for a {ways}-way task")
            outputs = outputs[..., :ways]
        return outputs, std

    def predict(self, support_inputs: Inputs, support_labels: Sequence[Any] | Tensor,
                query_inputs: Inputs, *, steps: int | None = None) -> Prediction:
        """Adapt on a support set and predict the queries.

        Inputs are a batch tensor, or a sequence of tensors, PIL images or image file paths
        (preprocessed as the training data was); for regression, numbers or rows of numbers.
        Classification: ``support_labels`` are any hashable class names; the result carries them
        back. Regression: ``support_labels`` are the targets. ``steps`` overrides the trained
        number of inner gradient steps (gradient-based learners only). With a transductive
        method (``transduction``) the queries are classified together: give the whole query
        set; a single query is refused.
        """
        if self.transduction is not None and len(query_inputs) < 2:
            raise TransductionError(f"{self.transduction.method} is transductive: it classifies "
                                    "the whole query set together; give at least 2 queries, "
                                    f"got {len(query_inputs)}")
        support_x, query_x = self.inputs(support_inputs), self.inputs(query_inputs)
        if len(support_labels) != len(support_x):
            raise ValueError(f"{len(support_x)} support inputs but {len(support_labels)} labels")
        if not self.classification:
            targets = _numbers(support_labels).reshape(len(support_x), -1)
            outputs, std = self.adapt_and_predict_with_std(support_x, targets, query_x, steps=steps)
            return Prediction(outputs, std=std)
        classes = sorted({str(label) for label in support_labels})
        if len(classes) < 2:
            method = (f"{self.transduction.method} (transductive) needs"
                      if self.transduction is not None else "the support set needs")
            raise ValueError(f"{method} at least 2 classes in the support set, got "
                             f"{len(classes)}")
        self.check_ways(len(classes), support=len(support_x))
        index = {name: i for i, name in enumerate(classes)}
        targets = torch.tensor([index[str(label)] for label in support_labels])
        return Prediction(self.adapt_and_predict(support_x, targets, query_x, steps=steps), classes)

    def inputs(self, items: Inputs) -> Tensor:
        """A batch of model inputs, checked against the shape the model was trained on."""
        if isinstance(items, Tensor):
            batch = items.float()
        elif not self.classification:
            batch = _numbers(items).reshape(len(items), -1)
        elif len(items) == 0:
            raise ValueError("no inputs given")
        else:
            batch = torch.stack([self.image(item) for item in items])
        expected = tuple(self.spec["shape"]["input_shape"])
        if tuple(batch.shape[1:]) != expected:
            raise ValueError(f"inputs of shape {list(batch.shape[1:])}, this model takes "
                             f"{list(expected)}; pass raw images (paths or PIL) to preprocess them")
        return batch

    def image(self, item: Tensor | Image | str | os.PathLike[str]) -> Tensor:
        """One input image: a tensor as it is, a PIL image or an image file preprocessed exactly
        as the training data was (``spec["preprocessing"]``)."""
        if isinstance(item, Tensor):
            return item.float()
        from pipelines.preprocessing import preprocess_image

        return preprocess_image(item, self.spec["preprocessing"])

    def check_ways(self, ways: int, *, support: int | None = None) -> None:
        """Refuse, before any work, more classes than the learner can serve (a fixed head), or a
        task shape its knobs rule out (``Learner.check_task_shape``: SNAIL's sequence length)."""
        self.learner.check_ways(self.params, ways)
        if support is not None:
            type(self.learner).check_task_shape(self.learner.hparams, ways=ways, support=support)


def _numbers(values: Any) -> Tensor:
    if isinstance(values, Tensor):
        return values.float()
    if len(values) and isinstance(values[0], Tensor):
        return torch.stack([v.float() for v in values])
    return torch.as_tensor(values, dtype=torch.float32)


def find_model_folder(path: Path) -> Path:
    """The saved meta-model in ``path``: the folder itself, or ``artifacts/meta_model`` of an
    MLflow pyfunc model folder."""
    for candidate in (path, path / "artifacts" / PYFUNC_ARTIFACT):
        if (candidate / SPEC).is_file() and (candidate / WEIGHTS).is_file():
            return candidate
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model folder")
    raise FileNotFoundError(f"{path}: not an orch model (no {SPEC} and {WEIGHTS}, here or in "
                            f"artifacts/{PYFUNC_ARTIFACT} of an MLflow model)")


def decode_inputs(model: MetaModel, encoded: Sequence[str]) -> Tensor:
    """Turn serialised inputs into a batch: JSON number arrays (regression) or base64-encoded
    image files, preprocessed exactly as the model's training data was."""
    if not model.classification:
        rows = [json.loads(item) for item in encoded]
        return model.inputs([row if isinstance(row, list) else [row] for row in rows])
    import base64
    import binascii

    from pipelines.dataset import DatasetError
    from pipelines.preprocessing import decode

    images = []
    for i, item in enumerate(encoded):
        try:
            data = base64.b64decode(item, validate=True)
        except (binascii.Error, TypeError):
            raise DatasetError(f"input {i}: not base64 (expected a base64-encoded PNG/JPEG "
                               "file)") from None
        images.append(decode(data, name=f"input {i}"))
    return model.inputs(images)


def input_example(model: MetaModel) -> "pandas.DataFrame":
    """A small valid request for the model's pyfunc form, logged with it so that MLflow shows
    and checks how to call it: two support rows of two classes and one query (two for a model
    that classifies queries together, ``transduction``) -- tiny base64 PNG files (any size; the
    model's preprocessing resizes them) or, for regression, JSON numbers."""
    import pandas as pd

    if model.classification:
        across, down = _example_png(model, vertical=False), _example_png(model, vertical=True)
        rows = [("support", across, "across"), ("support", down, "down"), ("query", down, None)]
        if model.transduction is not None:
            rows.append(("query", across, None))
    else:
        width = int(model.spec["shape"]["input_shape"][0])
        outputs = int(model.spec["shape"]["output_size"])
        rows = [("support", json.dumps([-1.0] * width), json.dumps([-0.5] * outputs)),
                ("support", json.dumps([1.0] * width), json.dumps([0.5] * outputs)),
                ("query", json.dumps([0.0] * width), None)]
    return pd.DataFrame(rows, columns=["role", "input", "label"])


def _example_png(model: MetaModel, *, vertical: bool) -> str:
    """An 8x8 PNG of one bar, in the colour mode of the model's training images, as base64."""
    import base64
    import io

    from PIL import Image, ImageDraw

    mode = model.spec["preprocessing"].get("mode", "L")
    image = Image.new(mode, (8, 8), "white")
    ImageDraw.Draw(image).line([(4, 1), (4, 6)] if vertical else [(1, 4), (6, 4)], fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
