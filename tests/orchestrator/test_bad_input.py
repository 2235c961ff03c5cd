"""Bad input costs seconds: one line naming the file, key or argument, non-zero exit, no
traceback, and nothing created in the run folder or the stores."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from orchestrator.cli.main import cli

GOOD = {"name": "bad-input", "algorithms": {"maml": {"inner_lr": 0.01}}}


@pytest.fixture(scope="module")
def tiny_import(tmp_path_factory) -> Path:
    """An orch import of 12 random-pixel classes of 4 images each: 6 train, 6 val."""
    root = tmp_path_factory.mktemp("bad-input")
    source = root / "images"
    rng = np.random.default_rng(0)
    for c in range(12):
        (source / f"class{c:02d}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(
                source / f"class{c:02d}" / f"{i}.png")
    out = root / "imported"
    result = CliRunner().invoke(cli, ["data", "import", "image-folder", str(source), "--out", str(out),
                                      "--size", "8", "--grayscale", "--val-ratio", "0.5",
                                      "--test-ratio", "0"])
    assert result.exit_code == 0, result.output
    return out


def image_data(path, **overrides):
    return {"data": {"path": str(path), "ways": 3, "shots": 1, "queries": 1, **overrides},
            "model": {"backbone": "conv4", "filters": 4}}


def sweep_cases(tiny: Path, tmp: Path) -> dict[str, tuple[object, str]]:
    """Sweep-file contents (text, or a dict dumped as YAML) and the expected message fragment."""
    maml = GOOD["algorithms"]["maml"]
    return {
        "not yaml": ("name: [unclosed\n", "not valid YAML"),
        "empty": ("", "the sweep file is empty"),
        "a list": ("- maml\n- reptile\n", "must be a mapping of sections, got a list"),
        "unknown key": ({**GOOD, "trainig": {}}, "trainig: unknown key; allowed:"),
        "wrong type": ({**GOOD, "training": {"meta_batch": "lots"}}, "training.meta_batch: Input should be a valid integer"),
        "unknown algorithm": ({**GOOD, "algorithms": {"mammal": {}}}, "algorithms.mammal: unknown algorithm; allowed:"),
        "unknown backbone": ({**GOOD, "model": {"backbone": "vgg"}}, "model.backbone: unknown backbone 'vgg'; allowed: mlp, conv4, resnet12"),
        "low > high": ({**GOOD, "algorithms": {"maml": {"inner_lr": {"low": 0.1, "high": 0.01}}}},
                       "algorithms.maml.inner_lr: low (0.1) must not exceed high (0.01)"),
        "log range at 0": ({**GOOD, "algorithms": {"maml": {"outer_lr": {"low": 0, "high": 0.1, "log": True}}}},
                           "algorithms.maml.outer_lr: a log range needs low > 0"),
        "negative lr": ({**GOOD, "algorithms": {"maml": {**maml, "inner_lr": -0.01}}},
                        "algorithms.maml.inner_lr: learning rates must be > 0"),
        "zero trials": ({**GOOD, "search": {"trials": 0}}, "search.trials: Input should be greater than or equal to 1"),
        "grid over a continuous range": ({**GOOD, "search": {"sampler": "grid"}},
                                         "algorithms.maml.outer_lr: search.sampler grid cannot "
                                         "enumerate a continuous range"),
        "ways > classes": ({**GOOD, **image_data(tiny, ways=8)}, "has 6 classes, fewer than"),
        "shots + queries > images": ({**GOOD, **image_data(tiny, shots=3, queries=2)}, "images"),
        "missing data path": ({**GOOD, **image_data(tmp / "nowhere")}, "nowhere"),
        "not an orch import": ({**GOOD, **image_data(tiny.parent / "images")}, "images"),
    }


CASES = ["not yaml", "empty", "a list", "unknown key", "wrong type", "unknown algorithm",
         "unknown backbone", "low > high", "log range at 0", "negative lr", "zero trials",
         "grid over a continuous range",
         "ways > classes", "shots + queries > images", "missing data path", "not an orch import"]


def assert_one_line_failure(result, expected: str) -> None:
    output = result.output.strip()
    assert result.exit_code != 0
    assert "Traceback" not in output, output
    assert len(output.splitlines()) == 1, output
    assert expected in output, output


@pytest.mark.parametrize("case", CASES)
def test_bad_sweep_file_changes_nothing(case, tiny_import, tmp_path):
    content, expected = sweep_cases(tiny_import, tmp_path)[case]
    run_dir = tmp_path / "runs"
    if isinstance(content, dict):
        content = yaml.safe_dump({**content, "run_dir": str(run_dir)})
    path = tmp_path / "sweep.yaml"
    path.write_text(content)
    result = CliRunner().invoke(cli, ["launch", str(path)])
    assert_one_line_failure(result, expected)
    assert str(path) in result.output  # names the file
    assert not run_dir.exists() and not (tmp_path / "orch-runs").exists()


@pytest.mark.parametrize("option, value, expected", [
    ("--address", "127.0.0.1:9", "cannot reach the Ray cluster at 127.0.0.1:9"),
    ("--tracking-uri", "http://127.0.0.1:9", "cannot reach the MLflow tracking server at http://127.0.0.1:9"),
])
def test_unreachable_services_fail_fast(option, value, expected, tmp_path):
    run_dir = tmp_path / "runs"
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**GOOD, "run_dir": str(run_dir)}))
    started = time.monotonic()
    result = CliRunner().invoke(cli, ["launch", str(path), option, value])
    assert time.monotonic() - started < 30
    assert_one_line_failure(result, expected)
    assert not run_dir.exists()


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**GOOD, "run_dir": str(tmp_path / "runs")}))
    result = CliRunner().invoke(cli, ["--debug", "launch", str(path), "--address", "127.0.0.1:9"])
    assert result.exit_code != 0 and result.exception is not None


def test_promote_without_a_store_creates_none(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = CliRunner().invoke(cli, ["promote", "orch-nothing", "1", "--tracking-uri", uri])
    assert_one_line_failure(result, f"no MLflow tracking store at {uri}")
    assert not (tmp_path / "mlflow.db").exists()


def test_user_mistakes_and_machinery_failures_are_two_kinds():
    """Input to fix is a UserError, a part that failed is a MachineryError; the CLI prints both
    as one line (the tests above), and neither is the other."""
    from orchestrator.services import cluster, tracking
    from orchestrator.config import sweep_from_dict
    from orchestrator.errors import MachineryError, UserError

    with pytest.raises(UserError) as user:
        sweep_from_dict({"name": "x", "training": {"iterationz": 3}, "algorithms": {"maml": {}}})
    assert not isinstance(user.value, MachineryError)
    with pytest.raises(MachineryError) as machinery:
        cluster.check_reachable("127.0.0.1:9")
    assert not isinstance(machinery.value, UserError)
    with pytest.raises(MachineryError):
        tracking.check_reachable("http://127.0.0.1:9")
