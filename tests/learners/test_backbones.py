"""Every learner x backbone pair either works or is refused when the sweep file is read: a pair the
config accepts builds, takes a meta-gradient that is finite and not all zero, and evaluates, on a
tiny task of the kind the pair serves (flat inputs for ``mlp``, 16x16 images for the others);
a pair it refuses says why in one line, naming the key."""

from __future__ import annotations

import math

import pytest
import torch

from learners.backbones import BACKBONES
from learners.registry import LEARNERS
from orchestrator.config import ConfigError, sweep_from_dict
from orchestrator.training.factory import build_learner
from pipelines.base import Minibatches, Task, TaskFamily
from pipelines.sinusoid import Sinusoid

from test_contract import Clusters


class ImageClusters(Clusters):
    """The contract's Gaussian classes drawn as 1x16x16 images (each of 16 values a 4x4 patch)."""

    def task(self, split: str, seed: int, index: int, *, shots: int | None = None) -> Task:
        flat = super().task(split, seed, index, shots=shots)
        return Task(image(flat.support_x), flat.support_y, image(flat.query_x), flat.query_y)

    def minibatches(self, split: str, seed: int, indices, *, size: int) -> Minibatches:
        flat = super().minibatches(split, seed, indices, size=size)
        return Minibatches(image(flat.x.flatten(0, 1)).unflatten(0, flat.y.shape), flat.y)

    def input_shape(self) -> tuple[int, ...]:
        return (1, 16, 16)


def image(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, 1, 4, 4).repeat_interleave(4, -1).repeat_interleave(4, -2)


PAIRS = [(name, backbone) for name in sorted(LEARNERS) for backbone in BACKBONES]


@pytest.mark.parametrize("name, backbone", PAIRS, ids=[f"{n}-{b}" for n, b in PAIRS])
def test_every_learner_backbone_pair_works_or_is_refused_at_load(name, backbone):
    """The data a backbone reads decides the task: sinusoid numbers for ``mlp``, images for
    the others (``orch`` has no flat classification family, so a metric learner with ``mlp``
    is refused like any learner whose task kind the data is not)."""
    images = backbone != "mlp"
    data = ({"family": "images", "path": "unused", "ways": 3, "shots": 1, "queries": 2}
            if images else {"family": "sinusoid", "shots": 5, "queries": 5})
    raw = {"name": "pairs", "data": data, "algorithms": {name: {}},
           "model": {"backbone": backbone, "hidden": [16], "filters": 4}}
    cls = LEARNERS[name]
    kind = "classification" if images else "regression"
    if backbone in cls.unsupported_backbones or kind not in cls.task_kinds:
        with pytest.raises(ConfigError) as refused:
            sweep_from_dict(raw)
        message = str(refused.value)
        assert "\n" not in message and f"algorithms.{name}" in message
        return
    sweep = sweep_from_dict(raw)
    family: TaskFamily = ImageClusters(ways=3, shots=1, queries=2) if images else Sinusoid(
        shots=5, queries=5)
    learner = build_learner(sweep.model, name, {}, kind=family.kind,
                            input_shape=list(family.input_shape()), output_size=family.output_size(),
                            classes=family.class_count("train"))
    params = learner.init_params(0)
    gradient, stats = learner.batch_gradient(
        params, learner.training_batch(family, "train", 0, range(2)), vectorize=False)
    assert stats and all(math.isfinite(v) for v in stats.values())
    assert all(bool(torch.isfinite(g).all()) for g in gradient.values())
    assert any(float(g.abs().sum()) > 0 for g in gradient.values())
    scores = learner.batch_evaluate(params, family.batch("val", 0, range(2)), vectorize=False)
    assert scores and all(math.isfinite(v) for v in scores.values())


def test_a_backbone_that_does_not_read_the_data_is_refused_at_load():
    for data, backbone, hint in (({"family": "sinusoid"}, "conv4", "use mlp"),
                                 ({"family": "images", "path": "x"}, "mlp", "use conv4 or resnet12")):
        with pytest.raises(ConfigError, match=f"model.backbone: .*{hint}"):
            sweep_from_dict({"name": "x", "data": data, "model": {"backbone": backbone},
                             "algorithms": {"maml": {}}})
    # Left out, the backbone suits the data.
    assert sweep_from_dict({"name": "x", "data": {"path": "x"},
                            "algorithms": {"maml": {}}}).model.backbone == "conv4"
