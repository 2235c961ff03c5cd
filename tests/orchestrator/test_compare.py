"""``orch compare``: pairing, intervals, refusals, the JSON and files it writes, the cache, and
the shift transforms. Models are untrained (initial weights) Conv-4s with 8 filters and sinusoid
MLPs saved as folders: what is tested is the comparison, not the learners. The registry path
(``--sweep``) is tested in test_predict_serve.py, beside the sweep that registers champions."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from orchestrator.models.compare import report
from orchestrator.models.compare.scoring import Cell, paired_rows
from orchestrator.models.compare.settings import Entrant, Setting, plan_settings
from orchestrator.cli.compare import compare
from orchestrator.config import sweep_from_dict
from orchestrator.models.inference import Z95, Evaluation, interval95
from orchestrator.training.meta_model import MetaModel
from orchestrator.training.factory import build_family, build_learner, task_shape
from pipelines.shifts import KINDS, ShiftError, apply_shift, parse_shift

TASKS = 12


def save_model(folder: Path, algorithm: str, knobs: dict, data: dict, model: dict) -> Path:
    sweep = {"name": "compare-test", "data": data, "model": model, "algorithms": {algorithm: {}}}
    config = sweep_from_dict(sweep)
    learner = build_learner(config.model, algorithm, knobs, **task_shape(build_family(config.data)))
    return MetaModel.build(sweep, algorithm, knobs, learner.init_params(0)).save(folder)


@pytest.fixture(scope="module")
def image_models(omniglot_dir: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare-models")
    data = {"path": str(omniglot_dir), "ways": 5, "shots": 1, "queries": 5}
    conv = {"backbone": "conv4", "filters": 8}
    models = {"proto": save_model(root / "proto", "protonet", {}, data, conv),
              "maml": save_model(root / "maml", "maml", {"inner_lr": 0.4, "inner_steps": 1},
                                 data, conv)}
    models["copy"] = Path(shutil.copytree(models["proto"], root / "copy"))
    return models


@pytest.fixture(scope="module")
def sine_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare-sine")
    data = {"family": "sinusoid", "shots": 5, "queries": 5}
    mlp = {"backbone": "mlp", "hidden": [16, 16]}
    return {"maml": save_model(root / "maml", "maml", {"inner_lr": 0.01, "inner_steps": 1},
                               data, mlp),
            "alpaca": save_model(root / "alpaca", "alpaca", {}, data, mlp)}


def run(tmp_path: Path, *args: str):
    store = f"sqlite:///{tmp_path}/runs/mlflow.db"
    return CliRunner().invoke(compare, [*args, "--out", str(tmp_path / "out"),
                                        "--tracking-uri", store])


def as_json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


# -- pairing, refusal of a setting, the files and the JSON --------------------------------------

def test_copies_of_one_model_differ_by_exactly_zero_and_outputs_are_written(image_models,
                                                                             tmp_path):
    parameters = {name: sum(v.numel() for v in MetaModel.load(image_models[name]).params.values())
                  for name in ("proto", "maml")}
    result = run(tmp_path, str(image_models["proto"]), str(image_models["copy"]),
                 str(image_models["maml"]), "--ways", "5,20", "--shots", "1,2", "--tasks",
                 str(TASKS), "--shift", "shear:0,0.5", "--json")
    table = as_json(result)
    assert table["kind"] == "classification" and table["tasks"] == TASKS
    rows = table["rows"]
    settings = ["5way1shot", "5way2shot", "20way1shot", "20way2shot", "5way1shot.shear0.5"]
    assert [r["setting"] for r in rows] == [s for s in settings for _ in range(3)]
    assert set(rows[0]) == {"setting", "ways", "shots", "shift", "level", "model", "uri", "metric",
                            "mean", "ci95", "tasks", "diff_to_best", "diff_ci95", "significant",
                            "best", "log_likelihood", "log_likelihood_ci95", "coverage95",
                            "adapt_ms", "inner_steps", "parameters", "refused", "cached", "data",
                            "converted", "transductive"}
    assert {(r["data"], r["converted"]) for r in rows} == {(table["data"], False)}
    for setting in settings:
        proto, copy, maml = [r for r in rows if r["setting"] == setting]
        assert proto["mean"] == copy["mean"] and proto["tasks"] == TASKS
        # Untrained, the metric learner beats MAML's random head in every setting (by 0.03 to
        # 0.17 here); of the tied copies the first listed is the best, the other differs by 0.
        assert proto["best"] and not copy["best"] and not maml["best"]
        assert proto["diff_to_best"] == copy["diff_to_best"] == 0.0
        assert proto["diff_ci95"] == copy["diff_ci95"] == 0.0 and not copy["significant"]
        if setting.startswith("20way"):  # a fixed 5-way head cannot serve 20 ways
            assert maml["mean"] is None and "5-way output head" in maml["refused"]
            assert maml["adapt_ms"] is None and maml["parameters"] is None
        else:
            assert 0.0 <= maml["mean"] <= 1.0 and maml["refused"] is None
            assert maml["adapt_ms"] > 0 and maml["inner_steps"] == 1
            assert maml["parameters"] == parameters["maml"]
        # The cost of adapting: timed per model, a ProtoNet takes no inner step.
        assert proto["adapt_ms"] > 0 and copy["adapt_ms"] > 0
        assert proto["inner_steps"] == copy["inner_steps"] == 0
        assert proto["parameters"] == copy["parameters"] == parameters["proto"]
    sheared = [r for r in rows if r["setting"] == "5way1shot.shear0.5"]
    assert all(r["shift"] == "shear" and r["level"] == 0.5 for r in sheared)
    assert table["timed_on"].split(", ")[1:3] == ["cpu", "1 torch thread"]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "accuracy_vs_ms.png", "accuracy_vs_shift.png", "accuracy_vs_shots.png", "compare.csv",
        "compare.md"]
    lines = (out / "compare.csv").read_text().splitlines()
    assert len(lines) == 1 + len(rows) and "adapt_ms,inner_steps,parameters" in lines[0]
    markdown = (out / "compare.md").read_text()
    assert "| 20way1shot | maml | refused | - | - | - | - |" in markdown
    assert "Made by: `orch compare" in markdown
    assert "| ms/episode | inner steps | parameters |" in markdown
    first = next(r for r in rows if r["model"] == "proto")
    assert (f"| 5way1shot | proto | {100 * first['mean']:.2f} ± {100 * first['ci95']:.2f} | best | "
            f"{report.format_ms(first['adapt_ms'])} | 0 | {first['parameters']:,} |") in markdown
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path}/runs/mlflow.db"
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("orch-compare")
    (logged,) = client.search_runs([experiment.experiment_id])
    assert logged.data.params["tasks"] == str(TASKS)
    assert {a.path for a in client.list_artifacts(logged.info.run_id)} >= {"compare.csv",
                                                                         "compare.md"}


def test_a_rerun_with_one_more_model_scores_only_that_model(image_models, tmp_path):
    first = as_json(run(tmp_path, str(image_models["proto"]), "--tasks", str(TASKS), "--json"))
    again = as_json(run(tmp_path, str(image_models["proto"]), str(image_models["maml"]),
                        "--tasks", str(TASKS), "--json"))
    assert [r["cached"] for r in first["rows"]] == [False]
    assert [(r["model"], r["cached"]) for r in again["rows"]] == [("proto", True),
                                                                  ("maml", False)]
    assert again["rows"][0]["mean"] == first["rows"][0]["mean"]
    # A cached cell carries the cost timed when it was scored, and the notes say so.
    assert again["rows"][0]["adapt_ms"] == first["rows"][0]["adapt_ms"] > 0
    assert again["rows"][1]["adapt_ms"] > 0
    assert any(note.startswith("ms/episode of 1 cached cell (proto) were timed when first "
                               "scored") for note in again["notes"])
    assert not any("cached cell" in note for note in first["notes"])
    table = run(tmp_path, str(image_models["proto"]), str(image_models["maml"]), "--tasks",
                str(TASKS))  # both cached now: the terminal table
    assert table.exit_code == 0, table.output
    header = next(line for line in table.output.splitlines() if "setting" in line)
    assert all(column in header for column in ("ms/episode", "inner steps", "parameters"))
    proto = next(line for line in table.output.splitlines() if " proto " in line)
    assert report.format_ms(first["rows"][0]["adapt_ms"]) in proto
    assert "ms/episode of 2 cached cells (maml, proto)" in table.output


def test_regression_reports_mse_and_likelihood_where_a_model_predicts_one(sine_models, tmp_path):
    rows = as_json(run(tmp_path, str(sine_models["maml"]), str(sine_models["alpaca"]),
                       "--shots", "1,5", "--tasks", str(TASKS), "--json"))["rows"]
    assert [(r["setting"], r["model"]) for r in rows] == [
        ("1shot", "maml"), ("1shot", "alpaca"), ("5shot", "maml"), ("5shot", "alpaca")]
    assert all(r["metric"] == "mse" and r["mean"] > 0 for r in rows)
    for row in rows:
        assert (row["log_likelihood"] is None) == (row["model"] == "maml")
        assert row["model"] == "maml" or 0.0 <= row["coverage95"] <= 1.0
        assert row["adapt_ms"] > 0 and row["parameters"] > 0
        assert row["inner_steps"] == {"maml": 1, "alpaca": 0}[row["model"]]
    for setting in ("1shot", "5shot"):  # the lower MSE is the best
        pair = [r for r in rows if r["setting"] == setting]
        assert min(pair, key=lambda r: r["mean"])["best"]
    assert (tmp_path / "out" / "mse_vs_shots.png").is_file()
    assert (tmp_path / "out" / "mse_vs_ms.png").is_file()


@pytest.mark.parametrize("case", ["mixed", "image size", "ways for regression",
                                  "shift for regression", "named twice", "bad shift", "no model"])
def test_refusals_are_one_line_and_write_nothing(case, image_models, sine_models, tmp_path):
    proto, sine = str(image_models["proto"]), str(sine_models["maml"])
    if case == "image size":  # a model trained on 20x20 images, given the 28x28 import
        other = Path(shutil.copytree(proto, tmp_path / "small"))
        spec = json.loads((other / "spec.json").read_text())
        spec["preprocessing"]["size"] = spec["data_sources"][0]["preprocessing"]["size"] = 20
        spec["shape"]["input_shape"] = [1, 20, 20]
        (other / "spec.json").write_text(json.dumps(spec))
    args, message = {
        "mixed": ([proto, sine], "does regression and proto classifies images"),
        "image size": ([proto, str(tmp_path / "small")], "holds 1x28x28 (grey) images but the model was trained on "
                       "1x20x20 (grey); pass --convert"),
        "ways for regression": ([sine, "--ways", "5"], "--ways is for classification"),
        "shift for regression": ([sine, "--shift", "blur:1"], "--shift distorts images"),
        "named twice": ([proto, proto], "is named twice"),
        "bad shift": ([proto, "--shift", "twist:1"], "unknown kind 'twist'"),
        "no model": ([], "name at least one model"),
    }[case]
    result = run(tmp_path, *args, "--tasks", "3")
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs" / "compare-cache").exists()


# -- intervals on a known case -------------------------------------------------------------------

def fake_cell(label: str, scores: list[float], setting: Setting) -> Cell:
    entrant = Entrant(label, label, None, None, label)  # type: ignore[arg-type]
    return Cell(entrant, setting, Evaluation("accuracy", scores, "test", 1, 1, 5))


def test_intervals_and_paired_differences_on_a_known_case():
    setting = Setting(5, 1)
    n = 100
    a = [1.0, 0.0] * (n // 2)  # mean 0.5, std 0.5
    b = [x - 0.1 for x in a]  # 0.1 lower on every episode: a certain difference
    c = [0.5] * n  # the same mean as a, differing per episode by +-0.5
    assert interval95(a) == pytest.approx(Z95 * 0.5 / math.sqrt(n))
    rows = {r.model: r for r in paired_rows([fake_cell("a", a, setting),
                                              fake_cell("b", b, setting),
                                              fake_cell("c", c, setting)])}
    assert rows["a"].best and rows["a"].diff_to_best == 0.0 and not rows["a"].significant
    assert rows["b"].diff_to_best == pytest.approx(-0.1) and rows["b"].diff_ci95 == pytest.approx(0)
    assert rows["b"].significant  # a small, certain difference is real
    assert rows["c"].diff_to_best == pytest.approx(0.0)
    assert rows["c"].diff_ci95 == pytest.approx(Z95 * 0.5 / math.sqrt(n))
    assert not rows["c"].significant
    assert rows["a"].ci95 == pytest.approx(Z95 * 0.5 / math.sqrt(n))


def test_settings_list_the_shift_curve_once_at_the_first_setting():
    settings = plan_settings([5, 20], [1, 5], ("blur", [0.0, 0.5, 1.0]))
    assert [s.name for s in settings] == ["5way1shot", "5way5shot", "20way1shot", "20way5shot",
                                          "5way1shot.blur0.5", "5way1shot.blur1"]


# -- shift transforms ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_level_zero_is_the_identity_and_other_levels_move_the_image(kind):
    images = torch.zeros(3, 1, 28, 28)
    images[:, :, 6:22, 12:16] = 1.0  # a vertical stroke
    assert torch.equal(apply_shift(images, kind, 0.0), images)
    level = {"shear": 0.5, "rotate": 30.0, "blur": 1.0, "noise": 0.3}[kind]
    generator = torch.Generator().manual_seed(0)
    shifted = apply_shift(images, kind, level, generator=generator)
    assert shifted.shape == images.shape and not torch.allclose(shifted, images, atol=1e-3)
    if kind in ("shear", "rotate", "blur"):  # resampling keeps values within the page and ink
        assert shifted.min() >= -1e-6 and shifted.max() <= 1 + 1e-6
    if kind == "blur":  # blurring spreads ink and keeps its amount (away from the edges)
        assert float(shifted.sum()) == pytest.approx(float(images.sum()), rel=1e-4)
    if kind == "noise":  # the same generator seed gives the same noise
        again = apply_shift(images, kind, level, generator=torch.Generator().manual_seed(0))
        assert torch.equal(shifted, again)
        assert float((shifted - images).std()) == pytest.approx(level, rel=0.1)


def test_shear_moves_the_top_and_bottom_of_a_vertical_stroke_apart():
    images = torch.zeros(1, 1, 28, 28)
    images[:, :, 2:26, 13:15] = 1.0
    sheared = apply_shift(images, "shear", 0.5)[0, 0]
    top, bottom = sheared[4].argmax(), sheared[23].argmax()
    assert abs(int(top) - int(bottom)) >= 6  # 19 rows apart, sheared by half a pixel per row


def test_noise_is_on_the_pixel_scale_of_normalised_inputs():
    images = torch.zeros(2, 3, 8, 8)
    preprocessing = {"std": [0.5, 0.25, 1.0]}
    noisy = apply_shift(images, "noise", 0.1, preprocessing=preprocessing,
                        generator=torch.Generator().manual_seed(1))
    spread = [float(noisy[:, c].std()) for c in range(3)]
    assert np.allclose(spread, [0.2, 0.4, 0.1], rtol=0.25)


@pytest.mark.parametrize("text, message", [
    ("shear", "give the levels after a colon"), ("shear:", "give the levels"),
    ("shear:0,x", "level 'x' is not a number"), ("blur:-1", ">= 0"),
    ("noise:0.1,0.1", "given twice"), ("warp:1", "unknown kind 'warp'")])
def test_bad_shift_arguments_are_refused(text, message):
    with pytest.raises(ShiftError, match=message):
        parse_shift(text)
    assert parse_shift("Shear:0, 0.2") == ("shear", [0.0, 0.2])
