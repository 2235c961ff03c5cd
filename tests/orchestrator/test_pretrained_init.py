"""``model.init`` without a tracking store: which entries move into which learner, what the
checkpoint identity counts, and the refusals of a model that cannot start the sweep's backbone --
each one line, before anything is written. The sweep started from a registered champion, through
real Ray, Optuna and MLflow, is in test_predict_serve.py beside the sweep that registers it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from orchestrator.models import pretrained
from orchestrator.training import initial
from orchestrator.sweep import checkpoints
from orchestrator.cli.main import cli
from orchestrator.config import ConfigError, sweep_from_dict
from orchestrator.training.factory import build_family, build_learner, task_shape
from orchestrator.training.meta_model import MetaModel
from orchestrator.training.loop import MetaTrainer

CONV = {"backbone": "conv4", "filters": 4}


def image_sweep(run_dir: Path, data: Path, algorithm: str, **model) -> dict:
    return {"name": "init", "run_dir": str(run_dir),
            "data": {"path": str(data), "ways": 3, "shots": 1, "queries": 2},
            "model": {**CONV, **model},
            "training": {"meta_batch": 2, "iterations": 3, "eval_every": 3, "eval_tasks": 3},
            "workers": {"count": 0},
            "algorithms": {algorithm: {}}}


def saved_model(folder: Path, data: Path | dict, algorithm: str, model: dict, *,
                seed: int = 0) -> Path:
    """An untrained model saved as a folder, as a trial saves one."""
    data = data if isinstance(data, dict) else {"path": str(data), "ways": 3, "shots": 1,
                                                "queries": 2}
    raw = {"name": "saved", "data": data, "model": model, "algorithms": {algorithm: {}}}
    sweep = sweep_from_dict(raw)
    learner = build_learner(sweep.model, algorithm, {}, **task_shape(build_family(sweep.data)))
    return MetaModel.build(raw, algorithm, {}, learner.init_params(seed)).save(folder)


@pytest.fixture(scope="module")
def source(omniglot_dir, tmp_path_factory) -> Path:
    """A MAML model folder (its own seed, so its backbone differs from every fresh one)."""
    return saved_model(tmp_path_factory.mktemp("init") / "maml", omniglot_dir, "maml", CONV,
                       seed=7)


@pytest.mark.parametrize("target", ["protonet", "maml", "mamlpp", "metasgd", "metaoptnet"])
def test_only_backbone_entries_move_and_per_step_rows_take_the_value_in_each(source, target,
                                                                               omniglot_dir):
    """Heads, per-weight rates, the logit scale and MAML++'s own state stay as the learner
    starts them; MAML++'s per-step BatchNorm rows each take the pretrained value."""
    sweep = sweep_from_dict(image_sweep(Path("unused"), omniglot_dir, target,
                                        init=str(source)))
    init = pretrained.resolve(sweep, "sqlite:///unused.db", input_shape=[1, 28, 28])
    model = MetaModel.load(source)
    weights = initial.backbone_weights(model.learner, model.params)
    assert init.weights.keys() == weights.keys() and init.digest == initial.digest(weights)
    assert all(torch.equal(init.weights[k], v) for k, v in weights.items())
    fresh = MetaTrainer(sweep, target, {}, farm=None).initial_params()
    start = MetaTrainer(sweep, target, {}, farm=None, init=init.weights).initial_params()
    assert set(start) == set(fresh) and set(weights) <= set(start)
    for name, value in start.items():
        if name in weights:
            rows = value if value.shape != weights[name].shape else value.unsqueeze(0)
            assert all(torch.equal(row, weights[name]) for row in rows), name
        else:
            assert torch.equal(value, fresh[name]), name
    assert any(not torch.equal(start[k], fresh[k]) for k in weights)


def test_a_per_step_source_gives_its_first_row(source, omniglot_dir, tmp_path):
    """A MAML++ model as the source: the rows its un-adapted network normalises with."""
    mamlpp = MetaModel.load(saved_model(tmp_path / "mamlpp", omniglot_dir, "mamlpp", CONV))
    name = "body.0.1.weight"
    mamlpp.params[name] = torch.stack([torch.full((4,), float(row)) for row in range(3)])
    weights = initial.backbone_weights(mamlpp.learner, mamlpp.params)
    assert torch.equal(weights[name], torch.zeros(4))
    assert all(weights[k].shape == s for k, s in initial.backbone_shapes(mamlpp.learner).items())


def test_the_checkpoint_identity_counts_the_initial_weights_not_the_uri(omniglot_dir, tmp_path):
    raw = image_sweep(tmp_path, omniglot_dir, "protonet")
    scratch = checkpoints.identity(sweep_from_dict(raw), "protonet", {})
    alias = sweep_from_dict({**raw, "model": {**CONV, "init": "models:/orch-maml@champion"}})
    pinned = sweep_from_dict({**raw, "model": {**CONV, "init": "models:/orch-maml/1"}})
    first = checkpoints.identity(alias, "protonet", {}, init_digest="a" * 16)
    assert first != scratch
    assert first != checkpoints.identity(alias, "protonet", {}, init_digest="b" * 16)
    assert first == checkpoints.identity(pinned, "protonet", {}, init_digest="a" * 16)


def test_init_on_regression_data_is_refused_at_load():
    with pytest.raises(ConfigError, match="model.init: starts a backbone from an image "
                                          "classification model's; data.family sinusoid"):
        sweep_from_dict({"name": "x", "model": {"init": "models:/orch-maml@champion"},
                         "algorithms": {"maml": {}}})


def refusal_cases(source: Path, data: Path, tmp: Path) -> dict[str, tuple[str, str]]:
    """Case -> (init, the expected message fragment)."""
    small = Path(shutil.copytree(source, tmp / "small"))
    spec = json.loads((small / "spec.json").read_text())
    spec["shape"]["input_shape"] = [1, 20, 20]
    spec["preprocessing"]["size"] = 20
    (small / "spec.json").write_text(json.dumps(spec))
    sine = saved_model(tmp / "sine", {"family": "sinusoid"}, "maml", {"backbone": "mlp"})
    resnet = saved_model(tmp / "resnet", data, "protonet", {"backbone": "resnet12", "filters": 2})
    wider = saved_model(tmp / "wider", data, "protonet", {**CONV, "filters": 8})
    return {
        "regression model": (str(sine), "is a regression model (maml on sinusoid)"),
        "other image size": (str(small), "was trained on 20x20 1-channel images, this sweep's "
                             "data are 28x28 1-channel"),
        "other backbone": (str(resnet), "has backbone resnet12 (filters 2), this sweep's model "
                           "is conv4 (filters 4)"),
        "other widths": (str(wider), "has backbone conv4 (filters 8), this sweep's model is "
                         "conv4 (filters 4): body.0.0.weight is [8, 1, 3, 3] there, [4, 1, 3, 3] "
                         "here"),
        "no such folder": (str(tmp / "nowhere"), "no such model folder"),
        "not a URI": ("s3://bucket/model", "cannot read model URI 's3://bucket/model'"),
    }


def test_refusals_are_one_line_before_anything_is_written(source, omniglot_dir, tmp_path):
    """(A missing registered model or version, in a real store: test_predict_serve.py.)"""
    for case, (init, expected) in refusal_cases(source, omniglot_dir, tmp_path).items():
        run_dir = tmp_path / "runs"
        path = tmp_path / "sweep.yaml"
        path.write_text(yaml.safe_dump(image_sweep(run_dir, omniglot_dir, "protonet",
                                                   init=init)))
        result = CliRunner().invoke(cli, ["launch", str(path)])
        output = result.output.strip()
        assert result.exit_code == 1, (case, output)
        assert len(output.splitlines()) == 1 and expected in output, (case, output)
        assert f"{path}: model.init" in output, (case, output)
        # No run folder: no MLflow store or run, Optuna study or checkpoint.
        assert not run_dir.exists(), case
