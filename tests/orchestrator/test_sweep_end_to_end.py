"""A tiny sweep through real Ray, Optuna and MLflow: runs, registry, champion alias, CLI views.
The tests read the module's sweep and never change it (what adds versions or moves an alias works
on a copy of its stores), so they pass in any order."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
from click.testing import CliRunner

from orchestrator.services import tracking
from orchestrator.cli.main import cli
from orchestrator.config import ConfigError, sweep_from_dict
from orchestrator.sweep.launch import launch


def tiny_sweep(run_dir, name: str, *, iterations: int, outer_lr: float, trials: int = 2) -> dict:
    return {
        "name": name, "run_dir": str(run_dir),
        "data": {"family": "sinusoid", "shots": 5, "queries": 5},
        "training": {"meta_batch": 8, "iterations": iterations, "eval_every": 10, "eval_tasks": 40},
        "workers": {"count": 1, "cpus": 0.5, "driver_cpus": 0.5},
        "search": {"trials": trials, "parallel": 2, "pruner": "none"},
        "algorithms": {
            "maml": {"inner_lr": {"low": 0.005, "high": 0.02, "log": True}, "outer_lr": outer_lr},
            "reptile": {"inner_lr": 0.01, "inner_steps": 2, "outer_lr": outer_lr},
        },
    }


@pytest.fixture(scope="module")
def first_sweep(ray_local, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sweep") / "orch-runs"
    raw = tiny_sweep(run_dir, "e2e", iterations=30, outer_lr=0.005)
    summaries = launch(sweep_from_dict(raw))
    uri = f"sqlite:///{run_dir}/mlflow.db"
    return raw, summaries, uri, run_dir


def test_runs_are_nested_under_one_parent_per_algorithm(first_sweep):
    raw, summaries, uri, _ = first_sweep
    client = tracking.client(uri)
    experiment = client.get_experiment_by_name("e2e")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = {r.data.tags[tracking.TAG_ALGORITHM]: r for r in runs
               if r.data.tags.get(tracking.TAG_KIND) == "algorithm"}
    trials = [r for r in runs if r.data.tags.get(tracking.TAG_KIND) == "trial"]
    assert set(parents) == {"maml", "reptile"}
    assert len(trials) == 4
    for run in trials:
        algorithm = run.data.tags[tracking.TAG_ALGORITHM]
        assert run.data.tags["mlflow.parentRunId"] == parents[algorithm].info.run_id
        assert run.info.status == "FINISHED"
        assert {"inner_lr", "outer_lr", "meta_batch", "seed"} <= set(run.data.params)
        assert run.data.tags[tracking.TAG_NODES]  # the Ray node ids of its workers
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in history] == [10, 20, 30]
        assert run.data.tags[tracking.TAG_MODEL_URI] == f"runs:/{run.info.run_id}/model"
        assert "model/MLmodel" in {a.path for a in client.list_artifacts(run.info.run_id, "model")}
        assert "plots/learning_curves.png" in {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert all(s.registration is not None and s.registration.champion for s in summaries)
    for parent in parents.values():  # the study's plots, on the algorithm's run
        plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
        assert {"plots/optimization_history.png", "plots/optimization_history.html"} <= plots


def test_best_models_are_registered_with_tags_and_champion(first_sweep):
    _, summaries, uri, _ = first_sweep
    client = tracking.client(uri)
    for summary in summaries:
        name = f"orch-{summary.algorithm}"
        champion = client.get_model_version_by_alias(name, "champion")
        assert str(champion.version) == "1"
        assert champion.tags["orch.sweep"] == "e2e"
        assert champion.tags["orch.metric"] == "val_loss"
        assert champion.tags["orch.direction"] == "minimize"  # follows from the metric
        assert float(champion.tags["orch.metric_value"]) == pytest.approx(summary.best_value)
        assert champion.tags["orch.task_fingerprint"]


def copied_stores(run_dir, folder):
    """A copy of a sweep's two SQLite stores (artifacts stay where they are), so that a test
    that adds versions or moves an alias leaves the module's sweep as the other tests expect,
    whatever order they run in."""
    copy_dir = folder / "orch-runs"
    copy_dir.mkdir()
    for name in ("mlflow.db", "optuna.db"):
        shutil.copy2(run_dir / name, copy_dir / name)
    return copy_dir


@pytest.fixture(scope="module")
def worse_sweep(first_sweep, tmp_path_factory):
    """A second, worse MAML sweep registered beside the first one's champion, in a copy of the
    first sweep's stores."""
    _, summaries, _, run_dir = first_sweep
    copy_dir = copied_stores(run_dir, tmp_path_factory.mktemp("worse"))
    worse = tiny_sweep(copy_dir, "e2e-worse", iterations=10, outer_lr=1e-7, trials=1)
    worse["algorithms"].pop("reptile")
    (summary,) = launch(sweep_from_dict(worse))
    best_before = next(s for s in summaries if s.algorithm == "maml").best_value
    return summary, best_before, copy_dir


def test_a_worse_sweep_does_not_move_the_champion(worse_sweep):
    summary, best_before, copy_dir = worse_sweep
    assert summary.best_value > best_before
    assert summary.registration.version == "2" and not summary.registration.champion
    assert summary.registration.note.startswith("val_loss ") and "not better than champion v1" \
        in summary.registration.note
    client = tracking.client(f"sqlite:///{copy_dir}/mlflow.db")
    assert str(client.get_model_version_by_alias("orch-maml", "champion").version) == "1"
    listed = CliRunner().invoke(cli, ["models", "--tracking-uri", f"sqlite:///{copy_dir}/mlflow.db"])
    assert listed.exit_code == 0 and "orch-maml" in listed.output and "champion" in listed.output


def test_promote_moves_the_champion_and_orch_models_json_says_why(worse_sweep, tmp_path):
    _, _, worse_dir = worse_sweep
    uri = f"sqlite:///{copied_stores(worse_dir, tmp_path)}/mlflow.db"  # promotions on a copy
    runner = CliRunner()

    def notes() -> dict:
        result = runner.invoke(cli, ["models", "--json", "--tracking-uri", uri])
        assert result.exit_code == 0, result.output
        rows = json.loads(result.output)
        assert set(rows[0]) == {"name", "version", "metric", "direction", "value", "sweep",
                                "front", "aliases", "note"}
        assert all(isinstance(r["version"], int) and isinstance(r["aliases"], list) for r in rows)
        assert {r["name"] for r in rows} == {"orch-maml", "orch-reptile"}
        assert sum("champion" in r["aliases"] for r in rows) == 2
        return {(r["name"], r["version"]): r["note"] for r in rows}

    before = notes()
    assert before[("orch-maml", 1)] == "" and "not better than champion v1" in before[("orch-maml", 2)]
    moved = runner.invoke(cli, ["promote", "orch-maml", "2", "--tracking-uri", uri])
    assert moved.exit_code == 0, moved.output
    client = tracking.client(uri)
    assert str(client.get_model_version_by_alias("orch-maml", "champion").version) == "2"
    after = notes()  # version 2, promoted by hand, holds the alias; version 1 says since when not
    assert after[("orch-maml", 2)] == "" and \
        after[("orch-maml", 1)] == "champion until the alias moved to v2"
    missing = runner.invoke(cli, ["promote", "orch-maml", "9", "--tracking-uri", uri])
    assert missing.exit_code != 0 and "no version 9 of registered model 'orch-maml'" in missing.output


def test_orch_runs_lists_trials(first_sweep):
    _, _, _, run_dir = first_sweep
    result = CliRunner().invoke(cli, ["runs", "e2e", "--storage", f"sqlite:///{run_dir}/optuna.db"])
    assert result.exit_code == 0, result.output
    assert result.output.count("complete") == 4 and "inner_lr=" in result.output
    listed = CliRunner().invoke(cli, ["runs", "e2e", "--json", "--storage",
                                      f"sqlite:///{run_dir}/optuna.db"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.output)
    assert len(rows) == 4 and {r["state"] for r in rows} == {"complete"}
    assert set(rows[0]) == {"algorithm", "number", "state", "value", "values", "front", "params",
                            "reason"}
    assert all(r["values"] == {"val_loss": r["value"]} for r in rows)
    for algorithm in ("maml", "reptile"):  # one objective: the front is the best (ties too)
        own = [r for r in rows if r["algorithm"] == algorithm]
        best = min(r["value"] for r in own)
        assert {r["number"] for r in own if r["front"]} == \
            {r["number"] for r in own if r["value"] == best}
    assert all(isinstance(r["value"], float) and isinstance(r["params"], dict) for r in rows)


def test_same_name_without_resume_is_refused(first_sweep):
    raw, _, _, _ = first_sweep
    with pytest.raises(ConfigError, match="a sweep named 'e2e' already exists"):
        launch(sweep_from_dict(copy.deepcopy(raw)))


def test_local_sqlite_is_refused_on_a_multi_host_cluster():
    from orchestrator.sweep.launch import check_shared_stores

    one_host = [{"NodeManagerAddress": "127.0.0.1"}, {"NodeManagerAddress": "127.0.0.1"}]
    two_hosts = [{"NodeManagerAddress": "10.0.0.1"}, {"NodeManagerAddress": "10.0.0.2"}]
    check_shared_stores(one_host, "sqlite:///runs/mlflow.db", "sqlite:///runs/optuna.db")
    check_shared_stores(two_hosts, "http://head:5000", "postgresql://head/optuna")
    with pytest.raises(ConfigError, match="tracking URI sqlite:///runs/mlflow.db is a local file"):
        check_shared_stores(two_hosts, "sqlite:///runs/mlflow.db", "postgresql://head/optuna")
    with pytest.raises(ConfigError, match="Optuna storage sqlite:///o.db is a local file.*postgresql"):
        check_shared_stores(two_hosts, "http://head:5000", "sqlite:///o.db")
