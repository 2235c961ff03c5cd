"""The sweep file: every kind of bad input is one line naming the file, key path and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from orchestrator.config import ConfigError, Range, load_sweep, sweep_from_dict

BASE = {"name": "demo", "algorithms": {"maml": {"inner_lr": {"low": 0.001, "high": 0.1, "log": True}}}}


def test_defaults_and_knobs(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sweep = sweep_from_dict(BASE)
    assert sweep.data.family == "sinusoid"
    assert sweep.training.meta_batch == 25
    assert sweep.tracking_uri() == "sqlite:///orch-runs/mlflow.db"
    assert sweep_from_dict({**BASE, "tracking": {"uri": "http://file:5000"}}).tracking_uri() == \
        "http://file:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert sweep.tracking_uri() == "http://env:5000"
    assert sweep.tracking_uri("http://flag:5000") == "http://flag:5000"
    knobs = sweep.algorithms["maml"].knobs()
    assert knobs == {"inner_lr": Range(low=0.001, high=0.1, log=True)}


def test_quickstart_example_is_valid():
    sweep = load_sweep(Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml")
    assert set(sweep.algorithms) == {"maml", "fomaml", "reptile"}


@pytest.mark.parametrize("change, expected", [
    ({"bogus": 1}, "bogus: unknown key; allowed: algorithms, data"),
    ({"training": {"iterations": "many"}}, "training.iterations: Input should be a valid integer"),
    ({"training": {"iterationz": 3}}, "training.iterationz: unknown key; allowed: "),
    ({"algorithms": {"mamll": {}}}, "algorithms.mamll: unknown algorithm; allowed: alpaca, anil, baseline, baselinepp, fomaml, imaml, maml"),
    ({"algorithms": {"maml": {"inner_lr": {"low": 0.2, "high": 0.1}}}},
     "algorithms.maml.inner_lr: low (0.2) must not exceed high (0.1)"),
    ({"algorithms": {"maml": {"inner_lr": {"low": 0, "high": 0.1, "log": True}}}},
     "algorithms.maml.inner_lr: a log range needs low > 0"),
    ({"algorithms": {"maml": {"outer_lr": -0.1}}}, "algorithms.maml.outer_lr: learning rates must be > 0"),
    ({"algorithms": {"maml": {"inner_lrr": 0.1}}}, "algorithms.maml.inner_lrr: unknown knob; allowed: head, inner_lr"),
    ({"algorithms": {"maml": {"inner_steps": "x"}}}, "algorithms.maml.inner_steps: Input should be a valid integer"),
    ({"algorithms": {"maml": {"inner_steps": {"low": 0, "high": 3, "int": True}}}},
     "algorithms.maml.inner_steps: Input should be greater than or equal to 1"),
    ({"model": {"backbone": "resnet"}}, "model.backbone: unknown backbone 'resnet'; allowed: mlp, conv4, resnet12"),
    ({"search": {"trials": 0}}, "search.trials: Input should be greater than or equal to 1"),
    ({"data": {"family": "foo"}}, "data.family: unknown family 'foo'; allowed: sinusoid, images"),
    ({"data": {"family": "sinusoid", "path": "x"}}, "data.path: unknown key; allowed: eval_shots, family"),
    ({"name": None}, "name: Input should be a valid string"),
    ({"name": "bad name!"}, "name: must be 1-100 letters"),
    ({"algorithms": {}}, "algorithms: Dictionary should have at least 1 item"),
    ({"search": {"metric": "val_accuracy"}}, "search.metric: val_accuracy needs a classification"),
    ({"search": {"metric": ["val_loss", "val_accuracy"]}},
     "search.metric: val_accuracy needs a classification data set; sinusoid is regression"),
    ({"search": {"direction": "maximize"}}, "search.direction: maximize contradicts "
     "search.metric val_loss, which is minimized; leave search.direction out"),
    ({"search": {"metric": ["val_loss", "adapt_ms"], "direction": ["minimize", "maximize"]}},
     "search.direction: maximize contradicts search.metric adapt_ms, which is minimized"),
    ({"search": {"metric": ["val_loss", "adapt_ms"], "direction": "minimize"}},
     "search.direction: 1 direction for 2 objectives in search.metric"),
    ({"search": {"metric": ["val_loss", "speed"]}}, "search.metric: unknown objective 'speed'; "
     "allowed: val_loss, val_accuracy, adapt_ms, inner_steps, parameters"),
    ({"search": {"metric": ["val_loss", "adapt_ms", "val_loss"]}},
     "search.metric: val_loss is named twice"),
    ({"search": {"metric": ["adapt_ms", "val_loss"]}}, "search.metric: adapt_ms is a cost of "
     "adapting, to trade against a validation metric: name val_loss or val_accuracy first"),
    ({"search": {"metric": []}}, "search.metric: names no objective"),
    ({"search": {"metric": ["val_loss", "parameters"], "pruner": "median"}},
     "search.pruner: median prunes on one intermediate value and search.metric names 2 "
     "objectives"),
    ({"search": {"metric": ["val_loss", "inner_steps"], "sampler": "cmaes"}},
     "search.sampler: cmaes searches one objective and search.metric names 2"),
    ({"search": {"pruner": "asha"}}, "search.pruner: unknown pruner 'asha'; allowed: median, "
     "hyperband, successive_halving, none"),
    ({"search": {"pruner": {"name": "successive_halving", "reduction": 3}}},
     "search.pruner.reduction: unknown key; allowed: bootstrap_count, min_early_stopping_rate, "
     "min_resource, name, reduction_factor"),
    ({"search": {"pruner": {"name": "successive_halving", "reduction_factor": 1}}},
     "search.pruner.reduction_factor: Input should be greater than or equal to 2"),
    ({"search": {"pruner": {"name": "successive_halving", "min_resource": 0}}},
     "search.pruner.min_resource: must be at least 1 or auto, got 0"),
    ({"search": {"pruner": {"name": "successive_halving", "bootstrap_count": 2}}},
     "search.pruner.bootstrap_count: needs an integer min_resource"),
    ({"search": {"pruner": {"name": "successive_halving", "min_resource": 100,
                            "min_early_stopping_rate": 1}}},
     "search.pruner: its first rung is at iteration 400 (min_resource * reduction_factor ** "
     "min_early_stopping_rate), not below training.iterations 300"),
    ({"search": {"pruner": {"name": "median", "n_warmup_steps": 300}}},
     "search.pruner.n_warmup_steps: 300 is not below training.iterations 300"),
    ({"search": {"pruner": {"name": "hyperband", "max_resource": 500}}},
     "search.pruner.max_resource: 500 must exceed min_resource 1 and not exceed "
     "training.iterations 300"),
    ({"search": {"pruner": {"min_resource": 3}}}, "search.pruner: name the pruner"),
])
def test_bad_values_name_the_key(change, expected):
    with pytest.raises(ConfigError) as error:
        sweep_from_dict({**BASE, **change}, source="sweep.yaml")
    message = str(error.value)
    assert message.startswith("sweep.yaml: ")
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize("search, objectives, directions, pruner", [
    ({"metric": "val_loss"}, ["val_loss"], ["minimize"], "median"),
    ({"metric": "val_accuracy"}, ["val_accuracy"], ["maximize"], "median"),
    ({"metric": "val_accuracy", "direction": "maximize"}, ["val_accuracy"], ["maximize"], "median"),
    ({"metric": ["val_accuracy", "adapt_ms"]}, ["val_accuracy", "adapt_ms"],
     ["maximize", "minimize"], "none"),
    ({"metric": ["val_accuracy", "parameters"], "pruner": "none"},
     ["val_accuracy", "parameters"], ["maximize", "minimize"], "none"),
    ({"pruner": {"name": "successive_halving", "min_resource": 50, "reduction_factor": 3}},
     ["val_loss"], ["minimize"], "successive_halving"),
])
def test_the_direction_follows_from_the_metric(search, objectives, directions, pruner):
    """No direction given: val_accuracy is maximised, val_loss and every cost minimised; the
    default pruner is median for one objective and none for several (which cannot prune)."""
    data = {"path": "unread"} if "val_accuracy" in objectives else {"family": "sinusoid"}
    sweep = sweep_from_dict({"name": "x", "data": data, "search": search,
                             "algorithms": {"protonet" if "path" in data else "maml": {}}})
    assert sweep.search.objectives == objectives and sweep.search.directions == directions
    assert sweep.search.first_objective == objectives[0]
    assert sweep.search.pruning().name == pruner


def test_every_example_loads_and_leaves_the_direction_to_its_metric():
    for path in sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml")):
        load_sweep(path)  # reads no data: only the file's own keys are checked
        assert "direction" not in yaml.safe_load(path.read_text())["search"], path.name


@pytest.mark.parametrize("text, expected", [
    ("name: [unclosed", "not valid YAML"),
    ("", "the sweep file is empty"),
    ("- a\n- b\n", "must be a mapping of sections, got a list"),
    ("algorithms: {maml: {}}\n", "name: required key is missing"),
])
def test_bad_files(tmp_path, text, expected):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_sweep(path)
    assert str(error.value).startswith(str(path))
    assert expected in str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read sweep file"):
        load_sweep(tmp_path / "nope.yaml")


@pytest.mark.parametrize("knob, message", [
    ({"low": 0.01, "high": 0.1, "step": 0}, "step must be positive, got 0.0"),
    ({"low": 0.01, "high": 0.1, "step": 0.01, "log": True}, "a log range cannot have a step"),
])
def test_ranges_optuna_cannot_search_are_refused_at_load(knob, message):
    with pytest.raises(ConfigError, match=f"algorithms.maml.inner_lr: {message}"):
        sweep_from_dict({"name": "x", "algorithms": {"maml": {"inner_lr": knob}}})


@pytest.mark.parametrize("training, algorithm, expected", [
    ({"inner_checkpointing": 1}, "fomaml", "training.inner_checkpointing: fomaml is first order"),
    ({"inner_checkpointing": 1}, "protonet", "training.inner_checkpointing: protonet takes no inner "
                                             "gradient steps; it applies to maml, metasgd, anil"),
    ({"inner_checkpointing": 2}, "imaml", "training.inner_checkpointing: imaml keeps no inner-loop "
                                          "activations"),
    ({"inner_checkpointing": 2}, "mamlpp", "training.inner_checkpointing: mamlpp has an inner loop "
                                           "that inner checkpointing does not recompute"),
    ({"inner_checkpointing": 1, "vectorize": "on"}, "maml",
     "training.inner_checkpointing: recomputes the inner loop in the per-task autograd loop"),
    ({"inner_checkpointing": 0}, "maml", "training.inner_checkpointing: Input should be greater "
                                         "than or equal to 1"),
])
def test_inner_checkpointing_is_refused_where_it_cannot_apply(training, algorithm, expected):
    data = {"path": "unread"} if algorithm in ("protonet", "imaml") else {"family": "sinusoid"}
    with pytest.raises(ConfigError) as error:
        sweep_from_dict({"name": "x", "data": data, "training": training,
                         "algorithms": {algorithm: {}}}, source="sweep.yaml")
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_inner_checkpointing_reaches_the_learner():
    """The sweep file's key reaches the learner a trial's shard worker builds (here, in the
    trial's process as with workers.count 0; a Ray worker builds the same from the same dict),
    which then takes the per-task autograd loop, and gives the same meta-gradient."""
    from orchestrator.training.loop import ShardWorker

    spec = {"name": "x", "training": {"inner_checkpointing": 2}, "workers": {"count": 0},
            "algorithms": {"maml": {"inner_steps": 3}}}
    recomputing = ShardWorker(sweep_from_dict(spec).model_dump(), "maml", {"inner_steps": 3})
    assert recomputing.learner.inner_checkpointing == 2 and not recomputing.vectorize
    plain = ShardWorker(sweep_from_dict({**spec, "training": {"vectorize": "off"}}).model_dump(),
                        "maml", {"inner_steps": 3})
    assert plain.learner.inner_checkpointing is None
    params = plain.learner.init_params(0)
    expected, _, _ = plain.gradient(params, "train", 0, range(3))
    found, _, _ = recomputing.gradient(params, "train", 0, range(3))
    for name in expected:
        torch.testing.assert_close(found[name], expected[name], rtol=1e-6, atol=1e-7)


# -- one source for every key ----------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def test_every_sweep_key_says_what_it_means_and_the_docs_page_is_generated():
    """Each key's meaning lives in its field (``Field(description=...)``); ``orch config``
    reads it from there, and docs/sweep-file.md is its output, so the two cannot drift."""
    from click.testing import CliRunner

    from orchestrator import config_reference
    from orchestrator.cli.main import cli

    keys = config_reference.reference()  # raises for a key without a description
    paths = {key.path for key in keys}
    assert {"name", "training.inner_checkpointing", "search.pruner.reduction_factor",
            "services.outage_s", "data.path", "algorithms"} <= paths
    written = CliRunner().invoke(cli, ["config", "--markdown"])
    assert written.exit_code == 0, written.output
    assert (REPO / "docs" / "sweep-file.md").read_text() == written.output, \
        "docs/sweep-file.md is stale: .venv/bin/orch config --markdown > docs/sweep-file.md"
    annotated = CliRunner().invoke(cli, ["config", "--yaml"])
    assert annotated.exit_code == 0 and annotated.output == config_reference.annotated_yaml()


def test_the_readmes_annotated_example_is_orch_configs_word_for_word():
    """Every commented key of the README's example sweep file exists and its comment is that
    key's meaning as the model states it (what ``orch config --yaml`` prints), and the example
    is a valid sweep file."""
    from orchestrator import config_reference

    readme = (REPO / "README.md").read_text()
    block = readme.split("\n## The sweep file\n", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    meanings = {key.path: key.meaning for key in config_reference.reference()
                if not key.variant or key.variant.endswith((": sinusoid", ": median"))}
    stack: list[str] = []
    checked = 0
    for line in block.splitlines():
        indent = (len(line) - len(line.lstrip())) // 2
        key = line.strip().split(":", 1)[0]
        stack[indent:] = [key]
        if "  # " in line:
            path = ".".join(stack)
            assert path in meanings, f"README's example names {path}, which is no sweep key"
            assert line.split("  # ", 1)[1].strip() == meanings[path], (
                f"README's comment on {path} differs from its meaning in orch config")
            checked += 1
    assert checked >= 20
    sweep_from_dict(yaml.safe_load(block), source="README")
