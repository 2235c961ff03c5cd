"""Pretrained initialisation (``model.init``): every trial's backbone starts from the backbone
weights of another trained model -- Meta-Baseline (Chen et al. 2021) is ``protonet`` started from
a ``baselinepp`` champion; MAML or MetaOptNet from a pretrained backbone likewise.

The sweep driver resolves the URI once, in the sweep's tracking store, before anything is written
(``resolve``): a missing model, a regression model, a model trained on images of another size or
channels, or one whose backbone is another network or of other widths is refused in one line naming
both sides. The backbone entries then travel inside every trial's request (``Init``), so a trial
on a node that cannot read the store -- or the model folder -- starts from the same weights; their
digest is recorded on the trial's MLflow run, kept apart in the champion comparison
(``tracking.register``) and part of the trial's checkpoint identity.

What the backbone entries are: the meta-parameters named ``body.<name>``, one for each parameter
``<name>`` of the ``body`` of the learner's backbone module -- the feature extractor every
learner builds with ``learners.backbones.build_backbone`` and calls with its parameter dict (the
MLP's hidden layers, Conv-4's four blocks, ResNet-12's four residual blocks). Nothing else moves:
not the output layer (``head.*``), nor any learner's own networks and state, which live under
their own key prefixes (Meta-SGD's and MAML++'s rates ``lr.*``, SCA's critic, the LSTM
meta-learner, Matching's FCE, the relation and verification modules, SNAIL's blocks, MetaNet's
embedding copy ``embed.*`` and meta-learners, MetaOptNet's logit scale); these start as the
learner starts them. MAML++ keeps each BatchNorm weight and bias once per inner step
(``[steps + 1, channels]``): as a source it gives row 0, the row its un-adapted network
normalises with; as a target it takes the source's value in every row, as it starts them itself.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from learners.backbones import build_backbone
from learners.base import Learner, Params
from orchestrator.config import ConfigError, ModelSection, Sweep
from orchestrator.errors import first_line
from orchestrator.meta_model import MetaModel

BODY = "body."


@dataclass(frozen=True)
class Init:
    """A resolved ``model.init``: where it came from and the backbone entries trials start from."""

    uri: str  # as the sweep file gives it
    origin: str  # what it resolved to: "orch-baselinepp version 3", "run <id>", a folder
    run_id: str | None  # the MLflow run that trained it, where known
    digest: str  # of the backbone entries (``digest``)
    weights: Params  # the backbone entries, in the backbone module's shapes, on the CPU

    def record(self) -> dict[str, str]:
        """What is recorded of it: on the trial's run and the registered version as tags
        ``orch.init.<key>`` (``tracking.init_tags``), in a trained model's spec as ``init``."""
        return {"uri": self.uri, "from": self.origin, "run_id": self.run_id or "",
                "digest": self.digest}


def backbone_shapes(learner: Learner) -> dict[str, torch.Size]:
    """The backbone entries' names and their shapes in the backbone module (see the module
    docstring)."""
    return {BODY + name: p.shape for name, p in learner.backbone.body.named_parameters()}


def backbone_weights(learner: Learner, params: Params) -> Params:
    """The backbone entries of ``params``, in the module's shapes: a per-step stack (MAML++'s
    BatchNorm rows) gives its row 0."""
    weights = {}
    for name, shape in backbone_shapes(learner).items():
        value = params[name]
        weights[name] = (value[0] if value.shape != shape and value.shape[1:] == shape
                         else value).detach().cpu().clone()
    return weights


def transplant(learner: Learner, params: Params, weights: Params) -> Params:
    """``params`` (a learner's fresh meta-parameters) with its backbone entries replaced by
    ``weights``: an entry of the module's shape is copied, a per-step stack takes the value in
    every row. Raises ValueError where an entry's shape fits neither (``resolve`` has refused
    such a model before any trial starts)."""
    out = dict(params)
    for name, shape in backbone_shapes(learner).items():
        value, target = weights[name], params[name]
        if value.shape != shape or target.shape[-len(shape):] != shape:
            raise ValueError(f"the initial backbone's {name} is {list(value.shape)}, this "
                             f"learner's {list(target.shape)}")
        value = value.to(dtype=target.dtype, device=target.device)
        out[name] = value.expand(target.shape).clone()  # a per-step stack: the value in each row
    return out


def digest(weights: Params) -> str:
    """A digest of named tensors: names, shapes, dtypes and values."""
    hasher = hashlib.sha256()
    for name in sorted(weights):
        value = weights[name].detach().cpu().contiguous()
        hasher.update(f"{name}:{list(value.shape)}:{value.dtype};".encode())
        hasher.update(value.numpy().tobytes())
    return hasher.hexdigest()[:16]


def resolve(sweep: Sweep, tracking_uri: str, *, input_shape: list[int],
            source: str = "sweep") -> Init | None:
    """The sweep's ``model.init``, read from ``tracking_uri`` (or its folder) and checked against
    the sweep: None without one; else ``ConfigError`` in one line where it cannot start this
    sweep's backbone. ``input_shape`` is the sweep's data's ([channels, height, width])."""
    uri = sweep.model.init
    if uri is None:
        return None
    from orchestrator.inference import load, resolve as find

    where = f"{source}: model.init {uri}"
    try:
        found = find(uri, tracking_uri=tracking_uri)
        model = load(found)
    except (ValueError, OSError, KeyError) as error:  # UserErrors, unreadable or foreign specs
        raise ConfigError(f"{where}: {first_line(error)}") from None
    origin = (f"{found.name} version {found.version}" if found.version is not None
              else f"run {found.run_id}" if found.run_id else found.location)
    check_fits(model, sweep.model, input_shape, f"{where} ({origin})")
    weights = backbone_weights(model.learner, model.params)
    return Init(uri, origin, found.run_id, digest(weights), weights)


def check_fits(model: MetaModel, section: ModelSection, input_shape: list[int], where: str) -> None:
    """Refuse a model whose backbone cannot start the sweep's: a regression model, other image
    sizes or channels, another backbone network, other widths (an entry of another shape)."""
    spec = model.spec
    if not model.classification:
        raise ConfigError(f"{where} is a regression model ({spec['algorithm']} on "
                          f"{spec['sweep']['data'].get('family', 'sinusoid')}); init takes the "
                          "backbone of an image classification model")
    trained = list(spec["shape"]["input_shape"])
    if trained != list(input_shape):
        raise ConfigError(f"{where} was trained on {_image(trained)} images, this sweep's data "
                          f"are {_image(input_shape)}; init from a model of the same image size "
                          "and channels")
    theirs = ModelSection.model_validate(spec["sweep"]["model"])
    if theirs.backbone != section.backbone:
        raise ConfigError(f"{where} has backbone {_describe(theirs)}, this sweep's model is "
                          f"{_describe(section)}; set model.backbone to {theirs.backbone} or init "
                          f"from a {section.backbone} model")
    ours = build_backbone(section.backbone, input_shape, None, hidden=section.hidden,
                          filters=section.filters).body
    expected = {BODY + name: p.shape for name, p in ours.named_parameters()}
    for name, shape in backbone_shapes(model.learner).items():
        if expected.get(name) != shape:
            raise ConfigError(f"{where} has backbone {_describe(theirs)}, this sweep's model is "
                              f"{_describe(section)}: {name} is {list(shape)} there, "
                              f"{list(expected[name]) if name in expected else 'absent'} here")


def _image(shape: list[int]) -> str:
    if len(shape) != 3:
        return f"{shape}"
    channels, height, width = shape
    return f"{height}x{width} {channels}-channel"


def _describe(section: ModelSection) -> str:
    if section.backbone == "mlp":
        return f"mlp (hidden {list(section.hidden)})"
    return f"{section.backbone} (filters {section.filters})"

