"""Transduction and variable-way episodes end to end (real Ray, Optuna and MLflow): Ray workers
draw the same variable-way episodes and validate transductively as the driver does; a tiny sweep
tunes a transductive knob in its validation and registers a model that then evaluates, compares,
predicts and serves transductively by default; and the options of ``orch evaluate``, ``orch
compare`` and ``orch predict`` (``--transductive``, ``--episodes``) with their one-line
refusals. Conv-4 with 4 filters, a handful of iterations: what is tested is the plumbing."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from PIL import Image

from orchestrator.services.cluster import RayFarm
from orchestrator.cli.compare import compare
from orchestrator.config import sweep_from_dict
from orchestrator.training.meta_model import MetaModel
from orchestrator.cli.predict import evaluate, predict
from orchestrator.sweep.launch import launch
from orchestrator.services.tracking import PyfuncMetaModel
from orchestrator.training.loop import LocalFarm, MetaTrainer, ShardWorker

KNOBS = {"outer_lr": 0.003, "transductive": "laplacianshot", "laplacianshot_lam": 0.5}


def farm_sweep(omniglot_dir: Path, count: int):
    return sweep_from_dict({
        "name": "transductive-farm", "algorithms": {"protonet": {}},
        "data": {"path": str(omniglot_dir), "episodes": "variable", "augment_rotations": True},
        "model": {"backbone": "conv4", "filters": 4},
        "training": {"meta_batch": 3},
        "workers": {"count": count, "cpus": 0.5, "driver_cpus": 0.5}})


def test_ray_workers_draw_the_same_variable_episodes_and_validate_alike(ray_local,
                                                                         omniglot_dir):
    """Two Ray workers sample their shards of variable-way episodes from (split, seed, index):
    the meta-gradient and the transductive validation equal the in-process ones."""
    config = farm_sweep(omniglot_dir, 2)
    local = MetaTrainer(config, "protonet", KNOBS,
                        LocalFarm(ShardWorker(config.model_dump(), "protonet", KNOBS)))
    farm = RayFarm(config.model_dump(), "protonet", KNOBS, config.workers)
    try:
        remote = MetaTrainer(config, "protonet", KNOBS, farm)
        params = local.initial_params()
        expected, expected_stats = local.meta_gradient(params, iteration=2)
        actual, actual_stats = remote.meta_gradient(params, iteration=2)
        for name in expected:
            torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-5)
        assert actual_stats["train_loss"] == pytest.approx(expected_stats["train_loss"],
                                                           rel=1e-6)
        inductive = local.validate(params, tasks=4)
        assert remote.validate(params, tasks=4) == pytest.approx(inductive, rel=1e-5)
        assert len({pid for _, pid in farm.processes()}) == 2
    finally:
        farm.shutdown()
    plain = ShardWorker(config.model_dump(), "protonet", {"outer_lr": 0.003})
    assert plain.transduction is None and local.farm.worker.transduction.method == "laplacianshot"
    assert plain.evaluate(params, "val", 0, range(4))[0] != pytest.approx(
        local.farm.worker.evaluate(params, "val", 0, range(4))[0])


@pytest.fixture(scope="module")
def swept(ray_local, omniglot_dir, tmp_path_factory):
    """Two trials of ProtoNet on variable-way Omniglot episodes, validated by LaplacianShot
    with Optuna searching its lam; the champion registered as orch-protonet."""
    run_dir = tmp_path_factory.mktemp("transductive") / "orch-runs"
    raw = {"name": "transductive", "run_dir": str(run_dir),
           "data": {"path": str(omniglot_dir), "episodes": "variable"},
           "model": {"backbone": "conv4", "filters": 4},
           "training": {"meta_batch": 2, "iterations": 4, "eval_every": 4, "eval_tasks": 4},
           "workers": {"count": 0, "driver_cpus": 0.5},
           "search": {"trials": 2, "parallel": 1, "pruner": "none", "sampler": "random",
                      "metric": "val_accuracy", "direction": "maximize"},
           "algorithms": {"protonet": {"transductive": "laplacianshot",
                                       "laplacianshot_lam": {"low": 0.1, "high": 1.5}}}}
    (summary,) = launch(sweep_from_dict(raw))
    return f"sqlite:///{run_dir}/mlflow.db", summary, omniglot_dir


def test_the_sweep_tunes_the_transductive_knob_and_the_model_keeps_it(swept):
    uri, summary, _ = swept
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("transductive")
    trials = [run for run in client.search_runs([experiment.experiment_id])
              if run.data.tags.get("orch.kind") == "trial"]
    lams = {float(run.data.params["laplacianshot_lam"]) for run in trials}
    assert len(trials) == 2 and len(lams) == 2 and all(0.1 <= lam <= 1.5 for lam in lams)
    assert all(run.data.params["transductive"] == "laplacianshot" for run in trials)
    assert summary.registration is not None and summary.registration.champion
    version = client.get_model_version_by_alias("orch-protonet", "champion")
    model = MetaModel.load(mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri("orch-protonet", version.version),
        tracking_uri=uri))
    assert model.transduction.method == "laplacianshot"
    assert model.transduction.knobs.lam in lams


def cli(command, *args: str, uri: str):
    return CliRunner().invoke(command, [*args, "--tracking-uri", uri])


def test_evaluate_defaults_to_the_validated_method_and_takes_options(swept):
    uri, _, _ = swept
    champion = "models:/orch-protonet@champion"
    default = cli(evaluate, "--model", champion, "--tasks", "4", uri=uri)
    assert default.exit_code == 0, default.output
    assert ", variable.laplacianshot, 4 tasks: accuracy" in default.output
    assert "queries classified together by LaplacianShot (laplacianshot(lam=" in default.output
    fixed = cli(evaluate, "--model", champion, "--tasks", "4", "--episodes", "fixed", "--ways",
                "5", "--shots", "2", "--transductive", "ptmap:iterations=5", uri=uri)
    assert fixed.exit_code == 0, fixed.output
    assert ", 5way2shot.ptmap, 4 tasks: accuracy" in fixed.output
    plain = cli(evaluate, "--model", champion, "--tasks", "4", "--transductive", "none", uri=uri)
    assert plain.exit_code == 0 and ", variable, 4 tasks" in plain.output
    tags = MlflowClient(tracking_uri=uri).get_model_version_by_alias("orch-protonet",
                                                                     "champion").tags
    assert "orch.eval.test.variable.accuracy" in tags  # beside, not over, the transductive one
    assert tags["orch.eval.test.variable.laplacianshot.transductive"].startswith(
        "laplacianshot(lam=")
    assert tags["orch.eval.test.5way2shot.ptmap.transductive"] == "ptmap(iterations=5)"
    for args, message in [(["--shots", "5"], "--shots is for fixed N-way K-shot episodes"),
                          (["--transductive", "tim:rate=1"], "tim rate: unknown knob"),
                          (["--transductive", "magic"], "unknown transductive method 'magic'")]:
        refused = cli(evaluate, "--model", champion, "--tasks", "4", *args, uri=uri)
        assert refused.exit_code == 1 and message in refused.output, refused.output
        assert refused.output.count("\n") == 1


def test_compare_scores_inductive_and_transductive_columns_on_the_same_episodes(swept,
                                                                               tmp_path):
    uri, _, _ = swept
    result = cli(compare, "--sweep", "transductive", "--tasks", "4", "--episodes",
                 "fixed,variable", "--ways", "5", "--shots", "1", "--transductive",
                 "tim:iterations=20", "--json", "--out", str(tmp_path / "out"), uri=uri)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["rows"]
    assert [(r["setting"], r["model"].split(" ")[-1]) for r in rows] == [
        (setting, model) for setting in ("5way1shot", "variable")
        for model in ("orch-protonet@champion", "+tim(iterations=20)",
                      rows[2]["model"].split(" ")[-1])]
    assert rows[2]["transductive"].startswith("laplacianshot(lam=")
    assert [r["inner_steps"] for r in rows[:3]] == [0, 20, 0]
    assert all(r["tasks"] == 4 and r["diff_ci95"] is not None for r in rows)


def test_predict_and_the_served_model_classify_the_query_set_together(swept, tmp_path):
    uri, _, _ = swept
    support, query = tmp_path / "support", tmp_path / "query"
    generator = np.random.default_rng(0)
    images = {}
    for name in ("a/1.png", "b/1.png", "q1.png", "q2.png", "q3.png"):
        pixels = (generator.random((28, 28)) * 255).astype(np.uint8)
        path = (support if "/" in name else query) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, "L").save(path)
        images[name] = path
    champion = "models:/orch-protonet@champion"
    result = cli(predict, "--model", champion, "--support", str(support), "--query", str(query),
                 "--transductive", "bdcspn", "--format", "json", uri=uri)
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)) == 3
    for extra in (images["q2.png"], images["q3.png"]):
        extra.unlink()
    single = cli(predict, "--model", champion, "--support", str(support), "--query", str(query),
                 uri=uri)
    assert single.exit_code == 1 and single.output.count("\n") == 1
    assert "laplacianshot is transductive" in single.output and "got 1" in single.output

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias("orch-protonet", "champion").version
    served = mlflow.pyfunc.load_model(client.get_model_version_download_uri("orch-protonet",
                                                                            version))
    frame = pd.DataFrame([{"role": "support", "input": _png(generator), "label": label}
                          for label in ("a", "b")]
                         + [{"role": "query", "input": _png(generator)} for _ in range(4)])
    answer = served.predict(frame, params={"transductive": "tim:iterations=10"})
    assert len(answer) == 4 and set(answer["prediction"]) <= {"a", "b"}
    with pytest.raises(ValueError, match="got 1"):
        served.predict(frame.iloc[:3])  # the validated method, on a single query
    inductive = PyfuncMetaModel()
    inductive.model = MetaModel.load(mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri("orch-protonet", version),
        tracking_uri=uri))
    assert len(inductive.predict(None, frame.iloc[:3], params={"transductive": "none"})) == 1


def _png(generator: np.random.Generator) -> str:
    buffer = io.BytesIO()
    Image.fromarray((generator.random((28, 28)) * 255).astype(np.uint8), "L").save(buffer,
                                                                               format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_the_example_sweep_file_loads():
    from orchestrator.config import load_sweep

    example = load_sweep(Path(__file__).resolve().parents[2] / "examples" / "transductive.yaml")
    assert example.data.episodes == "variable"
    assert example.space("simpleshot")["transductive"] == "laplacianshot"


def test_the_logged_input_example_is_a_valid_request_for_a_transductive_model(swept):
    """The example MLflow logs with the model holds two queries where the model classifies
    queries together, so that it answers."""
    from orchestrator.training.meta_model import input_example

    uri, _, _ = swept
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias("orch-protonet", "champion").version
    served = PyfuncMetaModel()
    served.model = MetaModel.load(mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri("orch-protonet", version),
        tracking_uri=uri))
    example = input_example(served.model)
    assert list(example["role"]) == ["support", "support", "query", "query"]
    answer = served.predict(None, example)["prediction"]
    assert len(answer) == 2 and set(answer) <= {"down", "across"}
