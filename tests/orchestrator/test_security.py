"""Security defaults: loopback servers, YAML's safe loader, weights loaded without pickle code."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from orchestrator.cli.main import cli
from orchestrator.config import ConfigError, load_sweep, sweep_from_dict
from orchestrator.training.meta_model import SPEC, WEIGHTS, MetaModel


def test_ui_binds_loopback_by_default():
    host = next(p for p in cli.commands["ui"].params if p.name == "host")
    assert host.default == "127.0.0.1"


def test_yaml_tags_that_run_code_are_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "sweep.yaml"
    path.write_text(f'name: !!python/object/apply:os.system ["touch {marker}"]\nalgorithms: {{maml: {{}}}}\n')
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_sweep(path)
    assert not marker.exists()


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_model_weights_load_without_running_pickled_code(tmp_path):
    sweep = sweep_from_dict({"name": "s", "algorithms": {"maml": {}}})
    model = MetaModel.build(sweep.model_dump(mode="json"), "maml", {"inner_lr": 0.01},
                            {k: v for k, v in _params().items()})
    folder = model.save(tmp_path / "model")
    assert set(MetaModel.load(folder).params) == set(model.params)
    with open(folder / WEIGHTS, "wb") as handle:
        pickle.dump({"weights": _Payload()}, handle)
    with pytest.raises(pickle.UnpicklingError):
        MetaModel.load(folder)
    assert json.loads((folder / SPEC).read_text())["algorithm"] == "maml"


def _params() -> dict[str, torch.Tensor]:
    from learners.backbones import build_backbone

    return {k: v.detach() for k, v in build_backbone("mlp", (1,), 1).named_parameters()}
