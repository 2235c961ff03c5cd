"""A trained meta-model on disk: its weights and everything needed to rebuild and use it.

The folder holds ``weights.pt`` (a plain tensor dict, loaded with ``weights_only=True``) and
``spec.json`` (algorithm, resolved knobs, model and data sections of the sweep, the data's
preprocessing and the task fingerprint). MLflow stores this folder as the artifact of its pyfunc
model, and ``orch predict``, ``orch evaluate`` and notebooks all use it through ``MetaModel``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from learners.base import Learner, Params
from orchestrator.config import ModelSection, sweep_from_dict
from orchestrator.training import build_family, build_learner, task_shape

WEIGHTS = "weights.pt"
SPEC = "spec.json"


@dataclass
class Prediction:
    """Outputs for the query inputs: values (regression) or class names with scores."""

    outputs: Tensor
    classes: list[str] | None = None

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
        return cls(learner, {k: v.detach().cpu() for k, v in params.items()}, spec)

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> "MetaModel":
        folder = Path(folder)
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
        with torch.enable_grad():
            adapted = self.learner.adapt(self.params, support_x, support_y, steps=steps)
        with torch.no_grad():
            return self.learner.predict(self.params, {k: v.detach() for k, v in adapted.items()},
                                        query_x)

    def predict(self, support_inputs: Tensor, support_labels: Sequence[Any] | Tensor,
                query_inputs: Tensor, *, steps: int | None = None) -> Prediction:
        """Adapt on a support set and predict the queries.

        Classification: ``support_labels`` are any hashable class names; the result carries them
        back. Regression: ``support_labels`` is a tensor of targets.
        """
        if not self.classification:
            targets = torch.as_tensor(support_labels, dtype=torch.float32).reshape(len(support_inputs), -1)
            return Prediction(self.adapt_and_predict(support_inputs.float(), targets,
                                                     query_inputs.float(), steps=steps))
        classes = sorted({str(label) for label in support_labels})
        if len(classes) < 2:
            raise ValueError(f"the support set needs at least 2 classes, got {len(classes)}")
        ways = self.spec["shape"]["ways"]
        if self.learner_has_fixed_ways() and ways is not None and len(classes) > ways:
            raise ValueError(f"this {self.spec['algorithm']} model was trained {ways}-way; the support "
                             f"set has {len(classes)} classes")
        index = {name: i for i, name in enumerate(classes)}
        targets = torch.tensor([index[str(label)] for label in support_labels])
        outputs = self.adapt_and_predict(support_inputs.float(), targets, query_inputs.float(),
                                         steps=steps)
        return Prediction(outputs[:, :len(classes)], classes)

    def learner_has_fixed_ways(self) -> bool:
        return getattr(type(self.learner), "needs_head", True)


def decode_inputs(model: MetaModel, encoded: Sequence[str]) -> Tensor:
    """Turn serialised inputs into a batch: JSON number arrays (regression) or base64-encoded
    image files, preprocessed exactly as the model's training data was."""
    if not model.classification:
        rows = [json.loads(item) for item in encoded]
        return torch.tensor([row if isinstance(row, list) else [row] for row in rows],
                            dtype=torch.float32)
    import base64
    import io

    from PIL import Image

    from pipelines.preprocessing import preprocess_image

    images = [Image.open(io.BytesIO(base64.b64decode(item))) for item in encoded]
    return torch.stack([preprocess_image(image, model.spec["preprocessing"]) for image in images])
