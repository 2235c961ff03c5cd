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

Which entries are the backbone's, and how they move into a learner: ``training.initial``.
"""

from __future__ import annotations

from learners.backbones import build_backbone
from orchestrator.config import ConfigError, ModelSection, Sweep
from orchestrator.errors import first_line
from orchestrator.training.initial import BODY, Init, backbone_shapes, backbone_weights, digest
from orchestrator.training.meta_model import MetaModel


def resolve(sweep: Sweep, tracking_uri: str, *, input_shape: list[int],
            source: str = "sweep") -> Init | None:
    """The sweep's ``model.init``, read from ``tracking_uri`` (or its folder) and checked against
    the sweep: None without one; else ``ConfigError`` in one line where it cannot start this
    sweep's backbone. ``input_shape`` is the sweep's data's ([channels, height, width])."""
    uri = sweep.model.init
    if uri is None:
        return None
    from orchestrator.models.inference import load, resolve as find

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

