"""Where episodes come from: imports read through a ``pyarrow.fs`` URI, several imports in one
sweep, and imports other than a model's training data (``--data``, ``--convert``).

One module, so that one Ray session, one S3 server and one MLflow store serve all of it: moto's
standalone S3 server, started on 127.0.0.1 for this module, holds a copy of the Omniglot import;
a tiny sweep whose ``data.path`` names the bucket beside a local grey 28x28 import (multi-source)
registers a ProtoNet; and a small RGB 32x32 import built here with ``import_image_folder`` is the
"other domain". Models besides the registered one are untrained (initial weights) Conv-4s saved
as folders: what is tested is which images each model sees and what is recorded, not accuracy.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from PIL import Image

from orchestrator.cli.compare import compare
from orchestrator.config import ConfigError, sweep_from_dict
from orchestrator.cli.data import data
from orchestrator.training.factory import build_family, build_learner, task_shape
from orchestrator.models.inference import evaluate as evaluate_episodes, evaluation_family, load_meta_model
from orchestrator.training.meta_model import MetaModel
from orchestrator.cli.predict import evaluate
from orchestrator.sweep.launch import check_shared_stores, launch
from pipelines.dataset import CACHE_ENV, DatasetError, open_dataset, read_manifest
from pipelines.episodes import EpisodeFamily, MixedEpisodes, convert_pixels
from pipelines.importers import import_image_folder
from pipelines.preprocessing import make_preprocessing, normalise

BUCKET = "orch-data"
TASKS = "4"


# -- the S3 server, the imports, the models ------------------------------------------------------

class S3:
    """The server's address and a filesystem that may create buckets (the tests' own uploads)."""

    def __init__(self, port: int):
        self.endpoint = f"127.0.0.1:{port}"
        self.fs = pafs.S3FileSystem(endpoint_override=self.endpoint, scheme="http",
                                    allow_bucket_creation=True)

    def uri(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}?endpoint_override={self.endpoint}&scheme=http"

    def upload(self, folder: Path, prefix: str) -> str:
        pafs.copy_files(str(folder), f"{BUCKET}/{prefix}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)
        return self.uri(prefix)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> S3:
    """moto's S3 server on 127.0.0.1 with the test credentials in the environment (set before the
    module's Ray starts, so trial processes inherit them) and a data cache in a temporary folder."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with pytest.MonkeyPatch.context() as env:
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                           CACHE_ENV: str(tmp_path_factory.mktemp("data-cache"))}.items():
            env.setenv(key, value)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("moto's S3 server did not start") from None
                    time.sleep(0.1)
            store = S3(port)
            store.fs.create_dir(BUCKET)
            yield store
        finally:
            server.terminate()
            server.wait(timeout=10)


@pytest.fixture(scope="module")
def omniglot_uri(s3: S3, omniglot_dir: Path) -> str:
    return s3.upload(omniglot_dir, "omniglot")


def image_tree(root: Path, *, classes: int, per_class: int, mode: str, size: int) -> Path:
    """Class folders of seeded noise with a block of one colour (grey level) placed per class."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        colour = rng.integers(0, 256, 3 if mode == "RGB" else 1)
        for i in range(per_class):
            pixels = rng.integers(0, 40, (size, size, len(colour))).astype(np.uint8)
            corner = (c * 3) % (size - 8)
            pixels[corner:corner + 8, i % 8:i % 8 + 8] = colour
            target = root / f"class{c:02d}" / f"{i}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels if mode == "RGB" else pixels[..., 0]).save(target)
    return root


def save_model(folder: Path, data: dict) -> Path:
    sweep = {"name": "cross", "data": data, "model": {"backbone": "conv4", "filters": 8},
             "algorithms": {"protonet": {}}}
    config = sweep_from_dict(sweep)
    learner = build_learner(config.model, "protonet", {}, **task_shape(build_family(config.data)))
    return MetaModel.build(sweep, "protonet", {}, learner.init_params(0)).save(folder)


@pytest.fixture(scope="module")
def world(omniglot_dir, tmp_path_factory) -> dict[str, Path]:
    """An RGB 32x32 and a grey 28x28 import (each normalised by its train split's mean and std),
    and untrained ProtoNets for Omniglot and for the RGB import."""
    root = tmp_path_factory.mktemp("domains")
    rgb, grey = root / "rgb32", root / "grey28"
    for out, mode, size in ((rgb, "RGB", 32), (grey, "L", 28)):
        tree = image_tree(root / f"{out.name}-tree", classes=20, per_class=8, mode=mode, size=size)
        import_image_folder(tree, out, size=size, grayscale=mode == "L", val_ratio=0.3,
                            test_ratio=0.3)
    setting = {"ways": 5, "shots": 1, "queries": 3}
    return {"omniglot": omniglot_dir, "rgb": rgb, "grey": grey,
            "omni_model": save_model(root / "omni", {"path": str(omniglot_dir), **setting}),
            "rgb_model": save_model(root / "rgbm", {"path": str(rgb), **setting})}


@dataclass(frozen=True)
class Swept:
    uri: str  # the MLflow tracking URI of the sweep (compare logs there too)
    version: str  # the registered model version it made


@pytest.fixture(scope="module")
def swept(s3, ray_local, omniglot_uri, world, tmp_path_factory) -> Swept:
    """A one-trial ProtoNet sweep on the bucket's Omniglot mixed 3:1 with the grey import."""
    run_dir = tmp_path_factory.mktemp("runs")
    sweep = {
        "name": "from-s3", "run_dir": str(run_dir),
        "data": {"path": [omniglot_uri, str(world["grey"])], "weights": [3, 1], "ways": 3,
                 "shots": 1, "queries": 2},
        "model": {"backbone": "conv4", "filters": 4},
        "training": {"meta_batch": 2, "iterations": 2, "eval_every": 2, "eval_tasks": 4},
        "workers": {"count": 0, "driver_cpus": 1},
        "search": {"trials": 1, "pruner": "none"},
        "algorithms": {"protonet": {"outer_lr": 0.001}},
    }
    uri = f"sqlite:///{run_dir}/mlflow.db"
    [summary] = launch(sweep_from_dict(sweep), tracking_uri=uri)
    assert summary.counts["complete"] == 1 and summary.registration is not None
    return Swept(uri, summary.registration.version)


# -- imports behind a URI ----------------------------------------------------------------------

def test_episodes_read_by_uri_equal_the_local_ones(omniglot_uri, omniglot_dir):
    remote = EpisodeFamily(omniglot_uri, ways=5, shots=1, queries=3, rotate_splits=["train"])
    local = EpisodeFamily(omniglot_dir, ways=5, shots=1, queries=3, rotate_splits=["train"])
    for split, index in (("train", 0), ("train", 9), ("val", 2), ("test", 5)):
        a, b = remote.task(split, 7, index), local.task(split, 7, index)
        assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
        assert torch.equal(a.support_y, b.support_y) and torch.equal(a.query_y, b.query_y)
    assert remote.fingerprint_spec() == local.fingerprint_spec()
    # One copy on this node, named by its digest, downloaded once: a second open reuses it.
    arrow = read_manifest(omniglot_dir)["files"]["images.arrow"]
    copy = Path(os.environ[CACHE_ENV]) / f"{arrow['sha256']}.arrow"
    stamp = copy.stat().st_mtime_ns
    assert open_dataset(omniglot_uri).manifest == read_manifest(omniglot_dir)
    assert copy.stat().st_mtime_ns == stamp and copy.stat().st_size == arrow["bytes"]
    assert [p.name for p in copy.parent.iterdir() if p.suffix == ".arrow"] == [copy.name]


def test_data_info_verifies_the_bucket(omniglot_uri, omniglot_dir):
    remote = CliRunner().invoke(data, ["info", omniglot_uri, "--verify", "--json"])
    assert remote.exit_code == 0, remote.output
    local = json.loads(CliRunner().invoke(data, ["info", str(omniglot_dir), "--json"]).output)
    report = json.loads(remote.output)
    assert report["verified"] is True and report["path"] == omniglot_uri
    assert {k: v for k, v in report.items() if k not in ("path", "verified")} == \
        {k: v for k, v in local.items() if k not in ("path", "verified")}


def one_line_failure(result, *expected: str) -> str:
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    for text in expected:
        assert text in result.output, result.output
    return result.output


def test_damaged_uploads_and_secrets_in_uris_are_refused(s3, omniglot_dir, tmp_path,
                                                        monkeypatch):
    def info(*args: str):
        return CliRunner().invoke(data, ["info", *args])

    one_line_failure(info(s3.uri("nothing")), "s3://orch-data/nothing: no such folder")
    secret = f"s3://key:hunter2@{BUCKET}/omniglot?endpoint_override={s3.endpoint}&scheme=http"
    assert "hunter2" not in one_line_failure(info(secret), "holds a secret")
    one_line_failure(info(f"s3://{BUCKET}/omniglot?colour=blue"), "Unexpected query parameter")
    # An upload whose Arrow file was replaced by other bytes of the same length: the sizes pass,
    # the digest does not -- neither for --verify nor for a node's copy, which is never kept.
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("manifest.json", "images.parquet", "images.arrow"):
        (damaged / name).write_bytes((omniglot_dir / name).read_bytes())
    arrow = bytearray((damaged / "images.arrow").read_bytes())
    arrow[len(arrow) // 2] ^= 0xFF
    (damaged / "images.arrow").write_bytes(bytes(arrow))
    uri = s3.upload(damaged, "damaged")
    one_line_failure(info(uri, "--verify"), "s3://orch-data/damaged/images.arrow: sha256")
    fresh = tmp_path / "fresh-cache"  # a node that has no good copy of this digest yet
    monkeypatch.setenv(CACHE_ENV, str(fresh))
    with pytest.raises(DatasetError, match=r"s3://orch-data/damaged/images.arrow: sha256 .* does "
                                           r"not match the manifest's .*upload the folder again"):
        open_dataset(uri)
    assert [p.name for p in fresh.iterdir() if not p.name.endswith(".lock")] == []


def test_a_relative_data_path_is_refused_on_a_multi_host_cluster():
    two_hosts = [{"NodeManagerAddress": "10.0.0.1"}, {"NodeManagerAddress": "10.0.0.2"}]
    stores = ("http://head:5000", "postgresql://head/optuna")
    check_shared_stores(two_hosts, *stores, relative_data=[])
    check_shared_stores([two_hosts[0]], *stores, relative_data=["data/omniglot"])
    with pytest.raises(ConfigError, match="data.path data/omniglot is a relative local path the "
                                          "other hosts cannot reach; use a URI every node"):
        check_shared_stores(two_hosts, *stores, relative_data=["data/omniglot"])
    raw = {"name": "x", "algorithms": {"protonet": {}},
           "data": {"path": ["s3://b/omniglot", "/abs/cub", "data/mini"]}}
    assert sweep_from_dict(raw).data.relative_paths() == ["data/mini"]


# -- a sweep on the bucket, mixed with a local import --------------------------------------------

def test_a_sweep_on_the_bucket_records_its_mix(swept, omniglot_uri, world):
    client = MlflowClient(swept.uri)
    version = client.get_model_version("orch-protonet", swept.version)
    params = client.get_run(version.run_id).data.params
    assert params["data_sources"] == f"{omniglot_uri} {world['grey']}"
    assert params["data_weights"] == "0.75,0.25"
    model = load_meta_model("models:/orch-protonet@champion", tracking_uri=swept.uri)
    records = model.spec["data_sources"]
    assert [r["path"] for r in records] == [omniglot_uri, str(world["grey"])]
    assert records[0]["preprocessing"] != records[1]["preprocessing"]  # inverted; normalised
    assert model.spec["preprocessing"] == records[0]["preprocessing"]  # for raw image files
    # Evaluated on its own mix, the imports take turns; on the bucket's import alone (--data, a
    # URI) or the grey one, each is its own training data: no conversion, the plain tags.
    family = evaluation_family(model)
    assert isinstance(family, MixedEpisodes)
    assert [family.source_of("test", 0, i) for i in range(4)] == [0, 1, 0, 1]
    assert evaluate_episodes(model, family, tasks=4).data is None
    second = evaluation_family(model, data=str(world["grey"]))
    assert not second.converted and evaluate_episodes(model, second, tasks=2).data is None
    result = CliRunner().invoke(evaluate, ["--model", "models:/orch-protonet@champion", "--data",
                                           omniglot_uri, "--tasks", TASKS, "--tracking-uri",
                                           swept.uri])
    assert result.exit_code == 0, result.output
    assert "on test, 3way1shot, 4 tasks: accuracy" in result.output
    assert "orch.eval.test.3way1shot.accuracy" in \
        client.get_model_version("orch-protonet", swept.version).tags


# -- other imports than the training data --------------------------------------------------------

def test_conversion_is_the_models_treatment_of_the_raw_images():
    grey = np.random.default_rng(1).integers(0, 256, (2, 1, 20, 20)).astype(np.uint8)
    inverted_grey = make_preprocessing(size=20, mode="L", invert=True)
    rgb = make_preprocessing(size=20, mode="RGB", invert=False)
    # Grey to RGB: the import's inversion undone, the channel repeated.
    as_rgb = convert_pixels(grey, inverted_grey, rgb)
    assert as_rgb.shape == (2, 3, 20, 20)
    assert all(np.array_equal(c, 255 - grey[:, 0]) for c in as_rgb.transpose(1, 0, 2, 3))
    # RGB to grey: luminance (ITU-R 601-2), then the target's inversion.
    colour = np.random.default_rng(2).integers(0, 256, (1, 3, 20, 20)).astype(np.uint8)
    luminance = np.tensordot([0.299, 0.587, 0.114], colour[0].astype(float), axes=1)
    back = convert_pixels(colour, rgb, inverted_grey)
    assert np.abs(255 - back[0, 0].astype(float) - luminance).max() <= 1
    # The target's size, by the target's resampling.
    resized = convert_pixels(colour, rgb, make_preprocessing(size=12, mode="RGB", invert=False))
    expected = Image.fromarray(colour[0].transpose(1, 2, 0)).resize((12, 12),
                                                                    Image.Resampling.LANCZOS)
    assert np.array_equal(resized[0], np.asarray(expected).transpose(2, 0, 1))


def test_converted_episodes_are_the_same_images_normalised_as_the_model_does(world):
    target = MetaModel.load(world["rgb_model"]).spec["preprocessing"]
    plain = EpisodeFamily(world["omniglot"], ways=5, shots=1, queries=3)
    converted = EpisodeFamily(world["omniglot"], ways=5, shots=1, queries=3, convert_to=target)
    assert converted.converted and converted.input_shape() == (3, 32, 32)
    assert target["normalization"] != "none"  # the RGB import's own mean and std
    a, b = plain.task("test", 0, 4), converted.task("test", 0, 4)
    stored = np.rint(a.support_x.numpy() * 255).astype(np.uint8)  # Omniglot: no normalisation
    expected = normalise(convert_pixels(stored, plain.preprocessing(), target), target)
    assert torch.allclose(b.support_x, torch.from_numpy(expected))
    assert torch.equal(a.support_y, b.support_y)
    assert converted.fingerprint_spec()["converted_from"] == plain.preprocessing()


def test_evaluate_on_another_import_converts_only_when_asked(world):
    model, rgb = str(world["omni_model"]), str(world["rgb"])
    refused = CliRunner().invoke(evaluate, ["--model", model, "--data", rgb, "--tasks", TASKS])
    one_line_failure(refused, f"{rgb} holds 3x32x32 (RGB) images but the model was trained on "
                              "1x28x28 (grey); pass --convert")
    done = CliRunner().invoke(evaluate, ["--model", model, "--data", rgb, "--convert", "--tasks",
                                         TASKS])
    assert done.exit_code == 0, done.output
    assert f"on test of {rgb} (converted to 1x28x28), 5way1shot, 4 tasks: accuracy" in done.output
    # The other way round: grey, inverted strokes to an RGB model's input.
    back = CliRunner().invoke(evaluate, ["--model", str(world["rgb_model"]), "--data",
                                         str(world["omniglot"]), "--convert", "--tasks", TASKS])
    assert back.exit_code == 0 and "(converted to 3x32x32)" in back.output, back.output


def test_compare_records_the_import_and_who_saw_it_converted(world, swept, tmp_path):
    """The Omniglot folder model, the registered mix model (both grey 28x28) and the RGB model,
    on the RGB import: refused without --convert, then the same episodes for all three."""
    models = [str(world["omni_model"]), "models:/orch-protonet@champion", str(world["rgb_model"])]
    rgb = str(world["rgb"])

    def run(*args: str):
        return CliRunner().invoke(compare, [*models, "--data", rgb, "--ways", "3", "--tasks",
                                            TASKS, "--queries", "3", "--out", str(tmp_path / "out"),
                                            "--cache", str(tmp_path / "cache"), "--tracking-uri",
                                            swept.uri, *args])

    one_line_failure(run(), f"omni: {rgb} holds 3x32x32 (RGB) images but the model was trained "
                            "on 1x28x28 (grey)")
    mixed_first = CliRunner().invoke(compare, [models[1], "--tracking-uri", swept.uri, "--out",
                                               str(tmp_path / "out")])
    one_line_failure(mixed_first, "was trained on several imports; give --data the one")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    first = run("--convert", "--json")
    assert first.exit_code == 0, first.output
    table = json.loads(first.output)
    assert table["data"] == rgb
    assert {(r["model"], r["data"], r["converted"], r["cached"]) for r in table["rows"]} == {
        ("omni", rgb, True, False), ("orch-protonet@champion", rgb, True, False),
        ("rgbm", rgb, False, False)}
    assert any(note.startswith(f"omni saw the episodes of {rgb} converted to its input (28x28 L, "
                               "inverted) from 32x32 RGB") for note in table["notes"])
    markdown = (tmp_path / "out" / "compare.md").read_text()
    assert f"Episodes from: `{rgb}`" in markdown and "omni saw the episodes" in markdown
    with open(tmp_path / "out" / "compare.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["model"], r["data"], r["converted"]) for r in rows} == {
        ("omni", rgb, "True"), ("orch-protonet@champion", rgb, "True"), ("rgbm", rgb, "False")}
    again = json.loads(run("--convert", "--json").output)  # scored once: read from the cache
    assert [(r["cached"], r["mean"]) for r in again["rows"]] == \
        [(True, r["mean"]) for r in table["rows"]]


# -- a benchmark import end to end: CIFAR-FS from the official archive's layout -------------------

@pytest.fixture(scope="module")
def cifar_fs(tmp_path_factory) -> Path:
    """CIFAR-FS imported from a small ``cifar-100-python.tar.gz`` in the official layout (every
    class name, two images per class): what ``orch data import cifar-fs`` writes."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
    from fake_benchmarks import write_cifar100_archive

    root = tmp_path_factory.mktemp("cifar")
    archive = write_cifar100_archive(root / "cifar-100-python.tar.gz")
    out = root / "cifar-fs"
    result = CliRunner().invoke(data, ["import", "cifar-fs", str(archive), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_a_sweep_on_cifar_fs_then_omniglot_compared_on_it_converted(ray_local, cifar_fs, world,
                                                                    tmp_path):
    """ProtoNet swept on the CIFAR-FS import and registered; then ``orch compare`` scores it
    beside the Omniglot model on CIFAR-FS's test classes: the grey 28x28 model is refused without
    ``--convert`` and sees the same episodes converted with it."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sweep = {
        "name": "cifar-fs", "run_dir": str(tmp_path / "runs"),
        "data": {"path": str(cifar_fs), "ways": 5, "shots": 1, "queries": 1},
        "model": {"backbone": "conv4", "filters": 4},
        "training": {"meta_batch": 2, "iterations": 2, "eval_every": 2, "eval_tasks": 2},
        "workers": {"count": 0, "driver_cpus": 1},
        "search": {"trials": 1, "pruner": "none"},
        "algorithms": {"protonet": {"outer_lr": 0.001}},
    }
    [summary] = launch(sweep_from_dict(sweep), tracking_uri=uri)
    assert summary.counts["complete"] == 1 and summary.registration is not None
    champion = "models:/orch-protonet@champion"
    models = [champion, str(world["omni_model"])]

    def run(*args: str):
        return CliRunner().invoke(compare, [*models, "--data", str(cifar_fs), "--ways", "5",
                                            "--queries", "1", "--tasks", TASKS, "--out",
                                            str(tmp_path / "out"), "--tracking-uri", uri, *args])

    one_line_failure(run(), f"{cifar_fs} holds 3x32x32 (RGB) images but the model was trained "
                            "on 1x28x28 (grey)")
    assert not (tmp_path / "out").exists()
    table = as_json_table(run("--convert", "--json"))
    assert table["data"] == str(cifar_fs)
    assert {(r["model"], r["converted"]) for r in table["rows"]} == {
        ("orch-protonet@champion", False), ("omni", True)}
    assert all(0.0 <= r["mean"] <= 1.0 for r in table["rows"])


def as_json_table(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.output)
