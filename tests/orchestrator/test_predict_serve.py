"""Using registered models: ``orch predict`` on raw Omniglot PNGs, ``orch evaluate``, the Python
API, the pyfunc form and ``mlflow models serve``.

One module fixture imports the two small Omniglot zips with ``orch data import omniglot`` and runs
a tiny real sweep (Optuna, Ray, MLflow) that trains and registers ProtoNet and MAML, 5-way 1-shot
on Conv-4 with 16 filters, for 60 meta-batches of 4 episodes each. Support and query folders are
built from the raw 105x105 PNGs of the import's test alphabet, which no model saw in training:
four 5-way tasks of 5 characters each (one support image, five queries per character), because a
single 5-way task's accuracy depends as much on how alike its five characters are as on the model.
"""

from __future__ import annotations

import base64
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from PIL import Image

from orchestrator.cli.compare import compare
from orchestrator.config import sweep_from_dict
from orchestrator.cli.data import data
from orchestrator.models.inference import Z95, evaluate as evaluate_episodes, evaluation_family, load_meta_model
from orchestrator.training.meta_model import MetaModel, input_example
from orchestrator.cli.predict import evaluate, predict
from orchestrator.sweep.launch import launch
from pipelines.dataset import read_manifest

# Accuracy over the query folders is deterministic (seeded training, fixed files); the floors sit
# well below what was measured and far above chance (0.2).
FLOOR = {"protonet": 0.5, "maml": 0.35}
TASKS, CLASSES, QUERIES_PER_CLASS = 4, 5, 5


@dataclass(frozen=True)
class Folders:
    support: Path  # support/<character>/<one raw png>
    query: Path  # query/<character>__<file>.png


@dataclass(frozen=True)
class Trained:
    uri: str  # the MLflow tracking URI of the sweep
    data: Path  # the Omniglot import
    tasks: list[Folders]

    @property
    def support(self) -> Path:
        return self.tasks[-1].support

    @property
    def query(self) -> Path:
        return self.tasks[-1].query


@pytest.fixture(scope="module")
def trained(ray_local, omniglot_zips, tmp_path_factory) -> Trained:
    root = tmp_path_factory.mktemp("predict")
    imported = CliRunner().invoke(data, ["import", "omniglot", *map(str, omniglot_zips), "--out",
                                         str(root / "omniglot")])
    assert imported.exit_code == 0, imported.output
    run_dir = root / "orch-runs"
    sweep = {
        "name": "predict", "run_dir": str(run_dir),
        "data": {"path": str(root / "omniglot"), "ways": 5, "shots": 1, "queries": 5},
        "model": {"backbone": "conv4", "filters": 16},
        "training": {"meta_batch": 4, "iterations": 60, "eval_every": 60, "eval_tasks": 20},
        "workers": {"count": 0, "driver_cpus": 1},
        "search": {"trials": 1, "pruner": "none", "metric": "val_accuracy",
                   "direction": "maximize"},
        "algorithms": {"protonet": {"outer_lr": 0.003},
                       "maml": {"inner_lr": 0.4, "inner_steps": 1, "outer_lr": 0.005}},
    }
    uri = f"sqlite:///{run_dir}/mlflow.db"
    summaries = launch(sweep_from_dict(sweep), tracking_uri=uri)
    assert all(s.registration is not None and s.registration.champion for s in summaries)
    tasks = held_out_folders(root / "omniglot", omniglot_zips, root)
    return Trained(uri, root / "omniglot", tasks)


def held_out_folders(imported: Path, zips: list[Path], root: Path) -> list[Folders]:
    """``TASKS`` support/query folder pairs from the first characters of the import's test
    alphabet: one raw PNG per character as support, the next ones as queries, copied straight
    out of the zip."""
    alphabet = read_manifest(imported)["splits"]["test"]["alphabets"][0]
    tasks = []
    for source in zips:
        with zipfile.ZipFile(source) as archive:
            members = sorted(n for n in archive.namelist()
                             if f"/{alphabet}/" in n and n.endswith(".png"))
        if members:
            break
    with zipfile.ZipFile(source) as archive:
        characters = sorted({n.split("/")[-2] for n in members})
        for t in range(TASKS):
            folders = Folders(root / f"task{t}" / "support", root / f"task{t}" / "query")
            for character in characters[t * CLASSES:(t + 1) * CLASSES]:
                files = [n for n in members if n.split("/")[-2] == character]
                for i, member in enumerate(files[:1 + QUERIES_PER_CLASS]):
                    target = (folders.support / character / Path(member).name if i == 0 else
                              folders.query / f"{character}__{Path(member).name}")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(archive.read(member))
            tasks.append(folders)
    return tasks


def run_predict(trained: Trained, model: str, *extra: str, support: Path | None = None,
                query: Path | None = None):
    return CliRunner().invoke(predict, [
        "--model", model, "--support", str(support or trained.support),
        "--query", str(query or trained.query), "--tracking-uri", trained.uri, *extra])


def accuracy(rows: list[dict]) -> float:
    return float(np.mean([row["prediction"] == row["file"].split("__")[0] for row in rows]))


# -- orch predict --------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["protonet", "maml"])
def test_predict_on_raw_held_out_pngs_beats_chance(trained, algorithm):
    answers = []
    for task in trained.tasks:
        result = run_predict(trained, f"models:/orch-{algorithm}@champion", "--format", "json",
                             support=task.support, query=task.query)
        assert result.exit_code == 0, result.output
        rows = json.loads(result.output)
        assert sorted(row["file"] for row in rows) == sorted(p.name for p in task.query.iterdir())
        characters = sorted(p.name for p in task.support.iterdir())
        for row in rows:
            assert sorted(row["scores"]) == characters
            assert sum(row["scores"].values()) == pytest.approx(1.0, abs=1e-4)
            assert row["prediction"] == max(row["scores"], key=row["scores"].get)
        answers += rows
    assert len(answers) == TASKS * CLASSES * QUERIES_PER_CLASS
    measured = accuracy(answers)
    print(f"{algorithm}: {measured:.2f} of {len(answers)} raw held-out queries right (chance 0.20)")
    assert measured >= FLOOR[algorithm]


def test_predict_csv_and_steps_override(trained):
    as_csv = run_predict(trained, "models:/orch-maml@champion", "--format", "csv")
    assert as_csv.exit_code == 0, as_csv.output
    lines = as_csv.output.strip().splitlines()
    assert lines[0].split(",")[:2] == ["file", "prediction"]
    assert len(lines) == 1 + CLASSES * QUERIES_PER_CLASS
    trained_steps = as_csv.output
    no_adaptation = run_predict(trained, "models:/orch-maml@champion", "--format", "csv",
                                "--steps", "0")
    assert no_adaptation.exit_code == 0, no_adaptation.output
    assert no_adaptation.output != trained_steps  # MAML's inner step changes every score
    table = run_predict(trained, "models:/orch-protonet@champion")
    assert table.exit_code == 0 and sorted(trained.support.iterdir())[0].name in table.output


def test_predict_errors_are_one_line(trained, tmp_path):
    one_class = tmp_path / "one_class"
    first = sorted(trained.support.iterdir())[0]
    (one_class / first.name).mkdir(parents=True)
    (one_class / first.name / "a.png").write_bytes(next(first.iterdir()).read_bytes())
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "good.png").write_bytes(next(trained.query.iterdir()).read_bytes())
    (broken / "bad.png").write_bytes(b"not a png")
    cases = [
        (["models:/orch-nothing@champion"], {}, "no registered model 'orch-nothing'"),
        (["models:/orch-protonet@gold"], {}, "has no alias 'gold'; aliases: champion (version 1)"),
        (["models:/orch-protonet/7"], {}, "has no version 7; versions: 1"),
        (["models:/orch-protonet@champion"], {"support": one_class}, "at least 2 classes"),
        (["models:/orch-protonet@champion"], {"query": broken}, "bad.png: not a readable PNG/JPEG"),
        (["models:/orch-protonet@champion"], {"query": empty}, "query folder holds no PNG/JPEG"),
    ]
    for (model,), folders, message in cases:
        result = run_predict(trained, model, **folders)
        assert result.exit_code != 0
        assert message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    missing_store = CliRunner().invoke(predict, [
        "--model", "models:/orch-protonet@champion", "--support", str(trained.support),
        "--query", str(trained.query), "--tracking-uri", f"sqlite:///{tmp_path}/none/mlflow.db"])
    assert missing_store.exit_code != 0 and "no MLflow tracking store" in missing_store.output
    assert not (tmp_path / "none").exists()


# -- orch evaluate -------------------------------------------------------------------------------

def test_evaluate_reports_mean_and_interval_and_tags_the_version(trained):
    result = CliRunner().invoke(evaluate, [
        "--model", "models:/orch-protonet@champion", "--data", str(trained.data), "--split",
        "test", "--ways", "5", "--shots", "1", "--queries", "5", "--tasks", "40",
        "--tracking-uri", trained.uri])
    assert result.exit_code == 0, result.output
    assert "5way1shot, 40 tasks: accuracy" in result.output

    model = load_meta_model("models:/orch-protonet/1", tracking_uri=trained.uri)
    family = evaluation_family(model, data=trained.data, ways=5, shots=1, queries=5)
    episodes = evaluate_episodes(model, family, split="test", tasks=40)
    accuracies = np.array(episodes.per_task)
    assert len(accuracies) == 40 and ((0 <= accuracies) & (accuracies <= 1)).all()
    assert episodes.ci95 == pytest.approx(Z95 * accuracies.std() / math.sqrt(40))
    assert episodes.mean > 0.4  # chance is 0.2
    assert f"{100 * episodes.mean:.2f}% +- {100 * episodes.ci95:.2f}%" in result.output

    tags = MlflowClient(tracking_uri=trained.uri, registry_uri=trained.uri).get_model_version(
        "orch-protonet", "1").tags
    assert float(tags["orch.eval.test.5way1shot.accuracy"]) == pytest.approx(episodes.mean)
    assert float(tags["orch.eval.test.5way1shot.ci95"]) == pytest.approx(episodes.ci95)
    assert tags["orch.eval.test.5way1shot.tasks"] == "40"


def test_compare_scores_every_champion_of_the_sweep_on_the_same_episodes(trained, tmp_path):
    """``orch compare --sweep``: the sweep's two champions, paired on the same held-out episodes;
    both beat chance, MAML's 5-way head is refused at 20 ways, and the run is logged to MLflow."""
    result = CliRunner().invoke(compare, [
        "--sweep", "predict", "--data", str(trained.data), "--ways", "5,20", "--tasks", "20",
        "--shift", "noise:0,0.5", "--json", "--out", str(tmp_path / "out"),
        "--tracking-uri", trained.uri])
    assert result.exit_code == 0, result.output
    rows = {(r["setting"], r["model"]): r for r in json.loads(result.output)["rows"]}
    models = {"orch-maml@champion", "orch-protonet@champion"}
    assert {model for _, model in rows} == models
    for model in models:
        assert rows["5way1shot", model]["mean"] > 0.3  # chance is 0.2
        assert rows["5way1shot.noise0.5", model]["tasks"] == 20
    assert rows["20way1shot", "orch-maml@champion"]["refused"]
    assert rows["20way1shot", "orch-protonet@champion"]["best"]
    client = MlflowClient(tracking_uri=trained.uri)
    experiment = client.get_experiment_by_name("orch-compare")
    assert len(client.search_runs([experiment.experiment_id])) == 1


def test_fixed_head_refuses_more_classes_on_every_path_and_records_nothing(trained, tmp_path):
    """MAML's 5-way head cannot tell 20 classes apart: evaluate, predict and the served pyfunc
    refuse in one line, and no evaluation tag is written."""
    client = MlflowClient(tracking_uri=trained.uri, registry_uri=trained.uri)
    before = client.get_model_version("orch-maml", "1").tags
    refused = CliRunner().invoke(evaluate, [
        "--model", "models:/orch-maml@champion", "--data", str(trained.data), "--split", "test",
        "--ways", "20", "--tasks", "5", "--tracking-uri", trained.uri])
    assert refused.exit_code != 0
    assert len(refused.output.strip().splitlines()) == 1, refused.output
    assert "5-way output head; it cannot tell 20 classes apart" in refused.output
    assert client.get_model_version("orch-maml", "1").tags == before

    support = tmp_path / "support20"  # the 4 tasks' 5 classes each: 20 classes
    for task in trained.tasks:
        for image in task.support.glob("*/*.png"):
            (support / image.parent.name).mkdir(parents=True, exist_ok=True)
            (support / image.parent.name / image.name).write_bytes(image.read_bytes())
    assert len(list(support.iterdir())) == 20
    result = run_predict(trained, "models:/orch-maml@champion", support=support)
    assert result.exit_code != 0 and "cannot tell 20 classes apart" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output

    import pandas as pd

    rows = [{"role": "support", "input": _base64(p), "label": p.parent.name}
            for p in sorted(support.glob("*/*.png"))]
    rows += [{"role": "query", "input": _base64(p)} for p in sorted(trained.query.iterdir())]
    with pytest.raises(Exception, match="cannot tell 20 classes apart"):
        load_pyfunc(trained, "orch-maml").predict(pd.DataFrame(rows))
    served = load_pyfunc(trained, "orch-protonet").predict(pd.DataFrame(rows))
    assert len(json.loads(served["scores"][0])) == 20  # a metric learner serves all 20


def test_evaluate_regression_from_a_folder_needs_no_data(tmp_path):
    folder = sine_model().save(tmp_path / "sine")
    result = CliRunner().invoke(evaluate, ["--model", str(folder), "--tasks", "20"])
    assert result.exit_code == 0, result.output
    assert "5shot, 20 tasks: MSE" in result.output and "not recorded" in result.output
    refused = CliRunner().invoke(evaluate, ["--model", str(folder), "--data", str(tmp_path)])
    assert refused.exit_code != 0 and "--data is for image models" in refused.output


def sine_model() -> MetaModel:
    """An untrained sinusoid MAML model: enough for the regression paths."""
    from orchestrator.training.factory import build_family, build_learner, task_shape

    sweep = {"name": "sine", "data": {"family": "sinusoid", "shots": 5, "queries": 5},
             "algorithms": {"maml": {}}}
    knobs = {"inner_lr": 0.01, "inner_steps": 1}
    config = sweep_from_dict(sweep)
    learner = build_learner(config.model, "maml", knobs, **task_shape(build_family(config.data)))
    return MetaModel.build(sweep, "maml", knobs, learner.init_params(0))


# -- Python API and pyfunc -----------------------------------------------------------------------

def test_load_meta_model_from_registry_run_or_folder(trained, tmp_path):
    client = MlflowClient(tracking_uri=trained.uri, registry_uri=trained.uri)
    version = client.get_model_version_by_alias("orch-maml", "champion")
    by_alias = load_meta_model("models:/orch-maml@champion", tracking_uri=trained.uri)
    by_run = load_meta_model(f"runs:/{version.run_id}/model", tracking_uri=trained.uri)
    folder = by_alias.save(tmp_path / "maml")
    by_folder = load_meta_model(folder)
    characters = sorted(trained.support.iterdir())
    paths = [next(c.iterdir()) for c in characters]
    labels = [c.name for c in characters]
    queries = sorted(trained.query.iterdir())[:12]
    from_paths = by_alias.predict(paths, labels, queries)
    from_pil = by_run.predict([Image.open(p) for p in paths], labels, [Image.open(q) for q in queries])
    tensors = by_folder.inputs(paths)
    from_tensors = by_folder.predict(tensors, labels, by_folder.inputs(queries))
    assert from_paths.labels == from_pil.labels == from_tensors.labels
    assert torch.allclose(from_paths.scores, from_tensors.scores)
    assert tensors.shape[1:] == (1, 28, 28)  # raw 105x105 PNGs, preprocessed as at import


def test_pyfunc_load_model_matches_orch_predict(trained):
    import pandas as pd

    result = run_predict(trained, "models:/orch-maml@champion", "--format", "json")
    assert result.exit_code == 0, result.output
    expected = json.loads(result.output)
    served = load_pyfunc(trained, "orch-maml")
    frame = request_frame(trained)
    outputs = served.predict(frame)
    assert list(outputs["prediction"]) == [row["prediction"] for row in expected]
    for scores, row in zip(outputs["scores"], expected):
        assert json.loads(scores) == pytest.approx(row["scores"], abs=1e-6)
    # The logged example's query is its "down" support image: a prototype network names it
    # (here at 0.99).
    example = input_example(load_meta_model("models:/orch-protonet@champion",
                                            tracking_uri=trained.uri))
    served = load_pyfunc(trained, "orch-protonet")
    assert list(served.predict(example)["prediction"]) == ["down"]
    # MAML's Conv-4 normalises with the statistics of the batch it is given (BatchNorm in
    # training mode, as the MAML paper's code does), so a query is answered in the company of
    # the other queries of its request. Sent alone, the example's query is normalised by itself
    # and comes out "across" (0.76 with the trained inner step); sent with the "across" image,
    # as a task's queries are, each support image is named by its own label (0.99 and 0.84),
    # and more inner steps fit them (0.999 each after 25).
    example = input_example(load_meta_model("models:/orch-maml@champion",
                                            tracking_uri=trained.uri))
    across = example[(example["role"] == "support") & (example["label"] == "across")]
    both = pd.concat([example[example["role"] == "support"],
                      across.assign(role="query", label=None),
                      example[example["role"] == "query"]], ignore_index=True)
    served = load_pyfunc(trained, "orch-maml")
    assert list(served.predict(both)["prediction"]) == ["across", "down"]
    assert list(served.predict(both, params={"steps": 25})["prediction"]) == ["across", "down"]


def load_pyfunc(trained: Trained, name: str):
    """The champion of ``name`` through ``mlflow.pyfunc.load_model``, from its registered
    version's artifact location: no process-wide MLflow URI is set (``mlflow.set_tracking_uri``
    would also set MLFLOW_TRACKING_URI for every later test). ``mlflow models serve`` below
    resolves ``models:/NAME@champion`` itself."""
    import mlflow.pyfunc

    client = MlflowClient(tracking_uri=trained.uri, registry_uri=trained.uri)
    version = client.get_model_version_by_alias(name, "champion").version
    return mlflow.pyfunc.load_model(client.get_model_version_download_uri(name, version))


def request_frame(trained: Trained):
    import pandas as pd

    rows = [{"role": "support", "input": _base64(p), "label": p.parent.name}
            for p in sorted(trained.support.glob("*/*.png"))]
    rows += [{"role": "query", "input": _base64(p)} for p in sorted(trained.query.iterdir())]
    return pd.DataFrame(rows)


def _base64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def test_input_example_is_a_small_valid_request():
    from orchestrator.services.tracking import PyfuncMetaModel

    regression = sine_model()
    example = input_example(regression)
    assert list(example["role"]) == ["support", "support", "query"]
    assert [json.loads(x) for x in example["input"]] == [[-1.0], [1.0], [0.0]]
    served = PyfuncMetaModel()
    served.model = regression
    out = served.predict(None, example)
    assert len(out) == 1 and len(json.loads(out["prediction"][0])) == 1


def test_registered_models_carry_signature_input_example_and_steps_param(trained):
    import mlflow
    import yaml

    client = MlflowClient(tracking_uri=trained.uri, registry_uri=trained.uri)
    for name in ("orch-protonet", "orch-maml"):
        version = client.get_model_version_by_alias(name, "champion")
        location = client.get_model_version_download_uri(name, version.version)
        mlmodel = yaml.safe_load(Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"{location}/MLmodel", tracking_uri=trained.uri)).read_text())
        assert {"inputs", "outputs"} <= set(mlmodel["signature"])
        assert mlmodel.get("saved_input_example_info", {}).get("type") == "dataframe", name
        assert "steps" in mlmodel["signature"].get("params", ""), name
    served = load_pyfunc(trained, "orch-maml")
    frame = request_frame(trained)
    trained_steps = served.predict(frame)
    no_adaptation = served.predict(frame, params={"steps": 0})
    assert list(trained_steps["scores"]) != list(no_adaptation["scores"])


# -- mlflow models serve -------------------------------------------------------------------------

def test_mlflow_models_serve_answers_a_task(trained):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    venv_bin = os.path.dirname(sys.executable)  # the server execs uvicorn from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": trained.uri,
           "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/orch-protonet@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_up(server, port, timeout_s=120)
        frame = request_frame(trained)
        records = [{k: v for k, v in row.items() if isinstance(v, str)}
                   for row in frame.to_dict(orient="records")]
        predictions = post(port, {"dataframe_records": records})["predictions"]
        expected = json.loads(run_predict(trained, "models:/orch-protonet@champion",
                                          "--format", "json").output)
        assert [p["prediction"] for p in predictions] == [row["prediction"] for row in expected]
        for answer, row in zip(predictions, expected):
            assert json.loads(answer["scores"]) == pytest.approx(row["scores"], abs=1e-6)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)  # the server and the uvicorn it started, nothing else
        server.communicate(timeout=30)


def wait_until_up(server: subprocess.Popen, port: int, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow models serve exited: {server.stdout.read().decode()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"mlflow models serve did not answer on port {port} in {timeout_s} s")


def post(port: int, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


# -- predictive uncertainty (ALPaCA) -------------------------------------------------------------

@pytest.fixture(scope="module")
def alpaca_folder(tmp_path_factory) -> Path:
    """A tiny ALPaCA sinusoid model (MLP 1-16-16) meta-trained for 100 iterations of 4 tasks
    through MetaTrainer and a LocalFarm, saved as a model folder."""
    from orchestrator.training.loop import LocalFarm, MetaTrainer, ShardWorker

    sweep = {"name": "alpaca", "data": {"family": "sinusoid", "shots": 5, "queries": 10},
             "model": {"backbone": "mlp", "hidden": [16, 16]},
             "training": {"meta_batch": 4, "iterations": 100, "eval_every": 100, "eval_tasks": 10},
             "algorithms": {"alpaca": {}}}
    config = sweep_from_dict(sweep)
    knobs = {"outer_lr": 0.01}
    trainer = MetaTrainer(config, "alpaca", knobs,
                          LocalFarm(ShardWorker(config.model_dump(), "alpaca", knobs)))
    threads = torch.get_num_threads()  # module fixtures run before conftest's single_thread
    torch.set_num_threads(1)
    try:
        outcome = trainer.train()
    finally:
        torch.set_num_threads(threads)
    model = MetaModel.build(sweep, "alpaca", knobs, outcome.params)
    return model.save(tmp_path_factory.mktemp("alpaca") / "model")


def sine_csv(folder: Path, *, shots: int = 5, queries: int = 4) -> tuple[Path, Path]:
    """support.csv (x, y rows of one sinusoid, with a header) and query.csv (x rows)."""
    xs = np.linspace(-4, 4, shots + queries)
    support, query = folder / "support.csv", folder / "query.csv"
    support.write_text("x,y\n" + "".join(f"{x},{2 * math.sin(x - 1)}\n" for x in xs[::2][:shots]))
    query.write_text("".join(f"{x}\n" for x in xs[1::2][:queries]))
    return support, query


def test_predict_and_pyfunc_return_std_for_alpaca_and_not_for_maml(alpaca_folder, tmp_path):
    import pandas as pd

    from orchestrator.services.tracking import PyfuncMetaModel

    support, query = sine_csv(tmp_path)
    as_json = CliRunner().invoke(predict, ["--model", str(alpaca_folder), "--support",
                                           str(support), "--query", str(query), "--format", "json"])
    assert as_json.exit_code == 0, as_json.output
    rows = json.loads(as_json.output)
    assert len(rows) == 4 and all(set(row) == {"input", "prediction", "std"} for row in rows)
    assert all(row["std"][0] > 0 for row in rows)
    as_csv = CliRunner().invoke(predict, ["--model", str(alpaca_folder), "--support",
                                          str(support), "--query", str(query), "--format", "csv"])
    assert as_csv.output.splitlines()[0] == "input,prediction,std"
    table = CliRunner().invoke(predict, ["--model", str(alpaca_folder), "--support", str(support),
                                         "--query", str(query)])
    assert table.exit_code == 0 and "std" in table.output

    served = PyfuncMetaModel()
    served.model = MetaModel.load(alpaca_folder)
    frame = pd.DataFrame([("support", line.split(",")[0], line.split(",")[1])
                          for line in support.read_text().splitlines()[1:]] +
                         [("query", line, None) for line in query.read_text().splitlines()],
                         columns=["role", "input", "label"])
    out = served.predict(None, frame)
    assert list(out.columns) == ["prediction", "scores", "std"]
    for answer, row in zip(out.to_dict(orient="records"), rows):
        assert json.loads(answer["prediction"]) == pytest.approx(row["prediction"], abs=1e-5)
        assert json.loads(answer["std"]) == pytest.approx(row["std"], abs=1e-5)

    maml = sine_model().save(tmp_path / "maml")
    maml_csv = CliRunner().invoke(predict, ["--model", str(maml), "--support", str(support),
                                            "--query", str(query), "--format", "csv"])
    assert maml_csv.exit_code == 0, maml_csv.output
    assert maml_csv.output.splitlines()[0] == "input,prediction"
    served.model = MetaModel.load(maml)
    assert list(served.predict(None, frame).columns) == ["prediction", "scores"]


def test_served_alpaca_pyfunc_keeps_the_std_column(alpaca_folder, tmp_path):
    """Through mlflow.pyfunc save/load with orch's signature, as ``mlflow models serve`` runs it."""
    import mlflow.pyfunc

    from orchestrator.services.tracking import PyfuncMetaModel, pip_requirements, pyfunc_signature

    model = MetaModel.load(alpaca_folder)
    mlflow.pyfunc.save_model(tmp_path / "pyfunc", python_model=PyfuncMetaModel(),
                             artifacts={"meta_model": str(alpaca_folder)},
                             pip_requirements=pip_requirements(), signature=pyfunc_signature(),
                             input_example=input_example(model))
    out = mlflow.pyfunc.load_model(str(tmp_path / "pyfunc")).predict(input_example(model))
    assert list(out.columns) == ["prediction", "scores", "std"] and json.loads(out["std"][0])[0] > 0


def test_uncertainty_scores_on_a_known_case():
    from orchestrator.models.inference import uncertainty_scores

    mean, std = torch.zeros(4, 1), torch.tensor([[1.0], [1.0], [1.0], [2.0]])
    targets = torch.tensor([[0.0], [1.95], [1.97], [-3.0]])  # inside, inside, outside, inside
    scores = uncertainty_scores(mean, std, targets)
    assert scores["coverage95"] == pytest.approx(0.75)
    densities = [-0.5 * math.log(2 * math.pi * s ** 2) - 0.5 * (t / s) ** 2
                 for t, s in [(0.0, 1.0), (1.95, 1.0), (1.97, 1.0), (-3.0, 2.0)]]
    assert scores["log_likelihood"] == pytest.approx(float(np.mean(densities)))


def test_evaluate_reports_likelihood_and_coverage_for_alpaca_only(alpaca_folder, tmp_path):
    result = CliRunner().invoke(evaluate, ["--model", str(alpaca_folder), "--tasks", "30"])
    assert result.exit_code == 0, result.output
    assert "query log-likelihood" in result.output and "95% predictive interval" in result.output
    model = MetaModel.load(alpaca_folder)
    episodes = evaluate_episodes(model, evaluation_family(model), split="test", tasks=30)
    assert set(episodes.uncertainty) == {"log_likelihood", "coverage95"}
    coverage = np.array(episodes.uncertainty["coverage95"])
    assert len(coverage) == 30 and ((0 <= coverage) & (coverage <= 1)).all()
    assert coverage.mean() > 0.8  # trained on the predictive likelihood: roughly calibrated
    tags = episodes.tags()
    assert float(tags["orch.eval.test.5shot.coverage95"]) == pytest.approx(coverage.mean())
    assert "orch.eval.test.5shot.log_likelihood" in tags
    plain = evaluate_episodes(sine_model(), evaluation_family(sine_model()), tasks=5)
    assert plain.uncertainty == {} and set(plain.tags()) == {
        "orch.eval.test.5shot.mse", "orch.eval.test.5shot.ci95", "orch.eval.test.5shot.tasks"}
    maml = CliRunner().invoke(evaluate, ["--model", str(sine_model().save(tmp_path / "m")),
                                         "--tasks", "5"])
    assert maml.exit_code == 0 and "log-likelihood" not in maml.output


# -- model.init: a sweep started from a champion's backbone --------------------------------------
# (Which entries move into which learner, the checkpoint identity and the refusals of folders that
# cannot start the backbone: test_pretrained_init.py.)

# The champions of ``trained`` an initialised sweep starts from (Meta-Baseline: baselinepp).
INIT_SOURCES = ["maml"]
INIT_TARGET = "protonet"


@dataclass(frozen=True)
class Initialised:
    trained: Trained
    source: str  # the source algorithm; its champion is models:/orch-<source>@champion
    raw: dict  # the initialised sweep
    registration: object  # its tracking.Registration

    @property
    def champion(self) -> str:
        return f"models:/orch-{self.source}@champion"


def init_sweep(trained: Trained, run_dir: Path, name: str, init: str) -> dict:
    """A sweep of ``INIT_TARGET`` on the data and backbone of ``trained``, in its store, started
    from ``init``; 3 iterations: what is tested is where it starts and what is recorded."""
    return {"name": name, "run_dir": str(run_dir),
            "tracking": {"uri": trained.uri, "registry_prefix": "init-"},
            "data": {"path": str(trained.data), "ways": 5, "shots": 1, "queries": 5},
            "model": {"backbone": "conv4", "filters": 16, "init": init},
            "training": {"meta_batch": 2, "iterations": 3, "eval_every": 3, "eval_tasks": 3},
            "workers": {"count": 0, "driver_cpus": 1},
            "search": {"trials": 1, "pruner": "none", "metric": "val_accuracy",
                       "direction": "maximize"},
            "algorithms": {INIT_TARGET: {"outer_lr": 0.003}}}


@pytest.fixture(scope="module", params=INIT_SOURCES)
def initialised(request, trained, tmp_path_factory) -> Initialised:
    raw = init_sweep(trained, tmp_path_factory.mktemp("init") / "runs", "init",
                     f"models:/orch-{request.param}@champion")
    (summary,) = launch(sweep_from_dict(raw))
    assert summary.registration is not None
    return Initialised(trained, request.param, raw, summary.registration)


def champion_backbone(initialised: Initialised) -> dict[str, torch.Tensor]:
    from orchestrator.training.initial import backbone_weights

    model = load_meta_model(initialised.champion, tracking_uri=initialised.trained.uri)
    return backbone_weights(model.learner, model.params)


def test_a_sweep_with_init_starts_from_the_champions_backbone_and_records_it(initialised):
    from orchestrator.models import pretrained
    from orchestrator.training import initial
    from orchestrator.services import tracking
    from orchestrator.training.loop import MetaTrainer

    uri = initialised.trained.uri
    client = tracking.client(uri)
    champion = client.get_model_version_by_alias(f"orch-{initialised.source}", "champion")
    weights = champion_backbone(initialised)
    digest = initial.digest(weights)
    (run,) = tracking.trial_runs(client, client.get_experiment_by_name("init").experiment_id)
    assert {k: v for k, v in run.data.tags.items() if k.startswith("orch.init.")} == {
        "orch.init.uri": initialised.champion, "orch.init.run_id": champion.run_id,
        "orch.init.from": f"orch-{initialised.source} version {champion.version}",
        "orch.init.digest": digest}
    registration = initialised.registration
    version = client.get_model_version(registration.name, registration.version)
    assert version.tags["orch.init.digest"] == digest
    trained = load_meta_model(f"models:/{registration.name}/{registration.version}",
                              tracking_uri=uri)
    assert trained.spec["init"] == {"uri": initialised.champion, "digest": digest,
                                    "run_id": champion.run_id,
                                    "from": f"orch-{initialised.source} version {champion.version}"}
    # Iteration 0 of that trial, rebuilt as the trial builds it: the champion's backbone, exactly.
    sweep = sweep_from_dict(initialised.raw)
    init = pretrained.resolve(sweep, uri, input_shape=[1, 28, 28])
    start = MetaTrainer(sweep, INIT_TARGET, {}, farm=None, init=init.weights).initial_params()
    assert set(weights) == {k for k in start if k.startswith("body.")}
    assert all(torch.equal(start[k], weights[k]) for k in weights)


def test_every_model_uri_form_gives_the_same_initial_weights(initialised, tmp_path):
    from orchestrator.models import pretrained
    from orchestrator.training import initial
    from orchestrator.services import tracking

    uri = initialised.trained.uri
    client = tracking.client(uri)
    champion = client.get_model_version_by_alias(f"orch-{initialised.source}", "champion")
    folder = Path(tracking.download_model(tracking.resolve_model(initialised.champion, uri),
                                          str(tmp_path))).resolve()
    name = f"orch-{initialised.source}"
    forms = {f"models:/{name}/{champion.version}": f"{name} version {champion.version}",
             f"runs:/{champion.run_id}/model": f"run {champion.run_id}",
             str(folder): str(folder)}
    expected = initial.digest(champion_backbone(initialised))
    for form, origin in forms.items():
        sweep = sweep_from_dict(init_sweep(initialised.trained, tmp_path, "forms", form))
        init = pretrained.resolve(sweep, uri, input_shape=[1, 28, 28])
        assert (init.origin, init.digest) == (origin, expected)


def test_a_champion_from_an_init_is_not_compared_with_one_from_scratch(initialised):
    """The same task fingerprint, another starting point: a champion trained from scratch keeps
    the alias against a better model trained from a backbone (as against a worse one)."""
    from orchestrator.services import tracking

    client = tracking.client(initialised.trained.uri)
    (from_init,) = tracking.trial_runs(client, client.get_experiment_by_name("init").experiment_id)
    scratch = client.get_model_version_by_alias(f"orch-{INIT_TARGET}", "champion").run_id
    common = dict(name="lineage", sweep_name="lineage", trial=0, metric_name="val_accuracy",
                  direction="maximize", fingerprint="one task")
    first = tracking.register(client, model_uri=f"runs:/{scratch}/model", run_id=scratch,
                              metric=0.4, **common)
    record = {k.removeprefix("orch.init."): v for k, v in from_init.data.tags.items()
              if k.startswith("orch.init.")}
    second = tracking.register(client, model_uri=f"runs:/{from_init.info.run_id}/model",
                               run_id=from_init.info.run_id, metric=0.9, init=record, **common)
    assert first.champion and not second.champion
    assert client.get_model_version("lineage", second.version).tags["orch.init.digest"] == \
        record["digest"]


def test_resuming_after_the_init_alias_moved_is_refused(initialised):
    from orchestrator.models import pretrained
    from orchestrator.training import initial
    from orchestrator.config import ConfigError
    from orchestrator.sweep.launch import check_same_init

    uri = initialised.trained.uri
    sweep = sweep_from_dict(initialised.raw)
    init = pretrained.resolve(sweep, uri, input_shape=[1, 28, 28])
    check_same_init(sweep, uri, init)  # the same weights: resumes
    moved = initial.Init(init.uri, "orch-maml version 9", None, "0" * 16, init.weights)
    with pytest.raises(ConfigError, match=r"started from backbone weights \w+ \(orch-.* now "
                                          r"gives weights 0{16} \(orch-maml version 9\)"):
        check_same_init(sweep, uri, moved)


@pytest.mark.parametrize("init, expected", [
    ("models:/orch-nothing@champion", "no registered model 'orch-nothing'"),
    ("models:/orch-maml/9", "registered model 'orch-maml' has no version 9"),
    ("models:/orch-maml@best", "registered model 'orch-maml' has no alias 'best'"),
    ("runs:/0123456789abcdef/model", "no run '0123456789abcdef'")])
def test_init_naming_a_missing_model_is_refused_before_anything_is_written(trained, tmp_path,
                                                                            init, expected):
    from orchestrator.cli.main import cli
    from orchestrator.services import tracking

    client = tracking.client(trained.uri)
    experiments = {e.name for e in client.search_experiments()}
    versions = tracking.registered_models(client)
    run_dir = tmp_path / "runs"
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps(init_sweep(trained, run_dir, "refused", init)))
    result = CliRunner().invoke(cli, ["launch", str(path)])
    output = result.output.strip()
    assert result.exit_code == 1 and len(output.splitlines()) == 1, output
    assert f"{path}: model.init {init}: {expected}" in output, output
    assert not run_dir.exists()  # no Optuna study, checkpoint or artifact
    assert {e.name for e in client.search_experiments()} == experiments  # no MLflow run
    assert tracking.registered_models(client) == versions


def test_meta_baseline_baselinepp_then_protonet_from_its_champion_on_two_workers(trained,
                                                                              tmp_path):
    """Meta-Baseline end to end: a ``baselinepp`` sweep pretrains (minibatch shards farmed over
    two Ray workers) and registers its champion; a ``protonet`` sweep starts from that
    champion's backbone (``model.init``), meta-trains on two workers and registers too."""
    from orchestrator.training import initial
    from orchestrator.services import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"

    def sweep(name: str, algorithms: dict, **model) -> dict:
        return {"name": name, "run_dir": str(tmp_path / "runs"),
                "data": {"path": str(trained.data), "ways": 5, "shots": 1, "queries": 5},
                "model": {"backbone": "conv4", "filters": 8, **model},
                "training": {"meta_batch": 2, "iterations": 4, "eval_every": 4, "eval_tasks": 4},
                "workers": {"count": 2, "cpus": 0.5, "driver_cpus": 1},
                "search": {"trials": 1, "pruner": "none", "metric": "val_accuracy",
                           "direction": "maximize"},
                "algorithms": algorithms}

    [pretraining] = launch(sweep_from_dict(sweep("pretrain", {"baselinepp": {
        "outer_lr": 0.001, "batch_size": 8, "adapt_epochs": 5}})), tracking_uri=uri)
    assert pretraining.counts["complete"] == 1 and pretraining.registration is not None
    champion = "models:/orch-baselinepp@champion"
    [meta] = launch(sweep_from_dict(sweep("meta", {"protonet": {"outer_lr": 0.001}},
                                          init=champion)), tracking_uri=uri)
    assert meta.counts["complete"] == 1 and meta.registration is not None
    client = tracking.client(uri)
    source = client.get_model_version_by_alias("orch-baselinepp", "champion")
    version = client.get_model_version(meta.registration.name, meta.registration.version)
    assert version.tags["orch.init.from"] == f"orch-baselinepp version {source.version}"
    weights = initial.backbone_weights(*_learner_and_params(champion, uri))
    assert version.tags["orch.init.digest"] == initial.digest(weights)
    (run,) = tracking.trial_runs(client, client.get_experiment_by_name("meta").experiment_id)
    assert run.data.params["workers"] == "2"


def _learner_and_params(uri: str, tracking_uri: str):
    model = load_meta_model(uri, tracking_uri=tracking_uri)
    return model.learner, model.params
