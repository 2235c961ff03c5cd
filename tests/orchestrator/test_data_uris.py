"""Imports read through a ``pyarrow.fs`` URI: a real S3-compatible server (moto's standalone
server, started on 127.0.0.1 for this module) holds a copy of the Omniglot import.

Episodes read by ``s3://`` URI equal the local ones; ``orch data info --verify`` reads the bucket;
a damaged upload or a URI carrying a secret is refused in one line; and a tiny sweep whose
``data.path`` names the bucket (beside a local import: multi-source) trains in a Ray trial
process, records the mix, and its model is evaluated on the bucket's import by ``--data``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from PIL import Image

from orchestrator.config import ConfigError, sweep_from_dict
from orchestrator.data_cli import data
from orchestrator.model_cli import evaluate
from orchestrator.sweep import check_shared_stores, launch
from pipelines.dataset import CACHE_ENV, DatasetError, open_dataset, read_manifest
from pipelines.episodes import EpisodeFamily
from pipelines.importers import import_image_folder

BUCKET = "orch-data"


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


def test_damaged_uploads_and_secrets_in_uris_are_refused(s3, omniglot_dir, tmp_path,
                                                        monkeypatch):
    def refusal(*args: str) -> str:
        result = CliRunner().invoke(data, ["info", *args])
        assert result.exit_code != 0 and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        return result.output

    assert "s3://orch-data/nothing: no such folder" in refusal(s3.uri("nothing"))
    secret = f"s3://key:hunter2@{BUCKET}/omniglot?endpoint_override={s3.endpoint}&scheme=http"
    message = refusal(secret)
    assert "holds a secret" in message and "hunter2" not in message
    assert "Unexpected query parameter" in refusal(f"s3://{BUCKET}/omniglot?colour=blue")
    # An upload whose Arrow file was replaced by other bytes of the same length: the sizes pass,
    # the digest does not -- neither for --verify nor for the node's copy, which is never kept.
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("manifest.json", "images.parquet", "images.arrow"):
        (damaged / name).write_bytes((omniglot_dir / name).read_bytes())
    arrow = bytearray((damaged / "images.arrow").read_bytes())
    arrow[len(arrow) // 2] ^= 0xFF
    (damaged / "images.arrow").write_bytes(bytes(arrow))
    uri = s3.upload(damaged, "damaged")
    assert "images.arrow: sha256" in refusal(uri, "--verify")
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


@pytest.fixture(scope="module")
def strokes(tmp_path_factory) -> Path:
    """A second grey 28x28 import: 12 classes of 10 bar images each, one bar position per class."""
    root = tmp_path_factory.mktemp("strokes")
    for c in range(12):
        for i in range(10):
            pixels = np.full((28, 28), 255, np.uint8)
            pixels[2 * c:2 * c + 2, i:i + 14] = 0
            target = root / "tree" / f"bar{c:02d}" / f"{i}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(target)
    out = root / "import"
    import_image_folder(root / "tree", out, size=28, grayscale=True, val_ratio=0.34,
                        test_ratio=0.01)
    return out


def test_a_sweep_reads_its_data_from_the_bucket(s3, ray_local, omniglot_uri, strokes, tmp_path):
    run_dir = tmp_path / "runs"
    sweep = {
        "name": "from-s3", "run_dir": str(run_dir),
        "data": {"path": [omniglot_uri, str(strokes)], "weights": [3, 1], "ways": 3, "shots": 1,
                 "queries": 2},
        "model": {"backbone": "conv4", "filters": 4},
        "training": {"meta_batch": 2, "iterations": 2, "eval_every": 2, "eval_tasks": 4},
        "workers": {"count": 0, "driver_cpus": 1},
        "search": {"trials": 1, "pruner": "none"},
        "algorithms": {"protonet": {"outer_lr": 0.001}},
    }
    uri = f"sqlite:///{run_dir}/mlflow.db"
    [summary] = launch(sweep_from_dict(sweep), tracking_uri=uri)
    assert summary.counts["complete"] == 1 and summary.registration is not None
    client = MlflowClient(uri)
    version = client.get_model_version("orch-protonet", summary.registration.version)
    params = client.get_run(version.run_id).data.params
    assert params["data_sources"] == f"{omniglot_uri} {strokes}"
    assert params["data_weights"] == "0.75,0.25"
    # The model records each import by path, digest and treatment; evaluated on the bucket's
    # import alone, that is its own training data, read again by URI.
    result = CliRunner().invoke(evaluate, ["--model", "models:/orch-protonet@champion", "--data",
                                           omniglot_uri, "--tasks", "4", "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    assert f"on test, 3way1shot, 4 tasks: accuracy" in result.output
    tags = client.get_model_version("orch-protonet", summary.registration.version).tags
    assert "orch.eval.test.3way1shot.accuracy" in tags
