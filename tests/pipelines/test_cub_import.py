"""CUB-200-2011 from a small copy of CUB_200_2011.tgz: Chen et al.'s 100/50/50 split, bounding
boxes, --crop, digests, --verify, and one-line refusals of bad archives."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from fake_benchmarks import CUB_CLASSES, cub_box, write_cub_archive
from data_cli_checks import refuses_bad_archive, run
from pipelines.dataset import read_manifest
from pipelines.episodes import EpisodeFamily

SIZE = 8


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """CUB_200_2011.tgz with all 200 classes, two small JPEGs each."""
    return write_cub_archive(tmp_path_factory.mktemp("cub") / "CUB_200_2011.tgz")


@pytest.fixture(scope="module")
def cub(archive: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imports") / "cub"
    result = run("import", "cub", archive, "--out", out, "--size", SIZE)
    assert result.exit_code == 0, result.output
    assert f"cub, 200 classes, 400 images, 3x{SIZE}x{SIZE}" in result.output
    return out


def test_chen_split_counts_boxes_and_digests(cub: Path, archive: Path):
    # Chen et al. 2019: class folders sorted, i % 2 == 0 train, i % 4 == 1 val, i % 4 == 3 test.
    expected = {"train": {c for i, c in enumerate(sorted(CUB_CLASSES)) if i % 2 == 0},
                "val": {c for i, c in enumerate(sorted(CUB_CLASSES)) if i % 4 == 1},
                "test": {c for i, c in enumerate(sorted(CUB_CLASSES)) if i % 4 == 3}}
    rows = pq.read_table(cub / "images.parquet",
                         columns=["class_name", "split", "source", "bbox", "source_size"]).to_pylist()
    found: dict[str, set[str]] = {}
    for row in rows:
        found.setdefault(row["split"], set()).add(row["class_name"])
    assert found == expected
    manifest = read_manifest(cub)
    assert {s: (v["classes"], v["images"]) for s, v in manifest["splits"].items()} == {
        "train": (100, 200), "val": (50, 100), "test": (50, 100)}
    first = rows[0]
    assert first["source"] == ("CUB_200_2011.tgz:CUB_200_2011/images/001.Black_footed_Albatross/"
                               "Black_footed_Albatross_0000_1.jpg")
    assert first["bbox"] == list(cub_box(0)) and rows[1]["bbox"] == list(cub_box(1))
    assert first["source_size"] == [24, 16]
    assert manifest["extra_columns"] == ["bbox", "source_size"] and manifest["crop"] is None
    assert manifest["sources"][0]["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert manifest["sources"][0]["official_release"] is False
    assert manifest["split_rule"]["definition"]["file"] == "pipelines/splits/cub.json"
    info = json.loads(run("info", cub, "--verify", "--json").stdout)
    assert info["verified"] is True and info["extra_columns"] == ["bbox", "source_size"]
    task = EpisodeFamily(cub, ways=5, shots=1, queries=1).task("test", 0, 0)  # the sampler reads it
    assert task.support_x.shape == (5, 3, SIZE, SIZE)


def test_crop_to_the_boxes_from_the_unpacked_folder(cub: Path, tmp_path: Path):
    folder = write_cub_archive(tmp_path / "unpacked", unpacked=True)
    result = run("import", "cub", folder, "--out", tmp_path / "cropped", "--size", SIZE, "--crop")
    assert result.exit_code == 0, result.output
    cropped = pq.read_table(tmp_path / "cropped" / "images.parquet", columns=["pixels"])
    whole = pq.read_table(cub / "images.parquet", columns=["pixels"])
    # Each fake photo is a white square (its box) on a coloured ground: cropped, only white is left.
    cropped_pixels = np.asarray(cropped.column("pixels").to_pylist(), np.uint8)
    whole_pixels = np.asarray(whole.column("pixels").to_pylist(), np.uint8)
    assert cropped_pixels.mean() > 235 > whole_pixels.mean()
    assert read_manifest(tmp_path / "cropped")["crop"] == "bounding boxes (bounding_boxes.txt)"


def _without_class(members: dict[str, bytes], folder: str) -> dict[str, bytes]:
    kept = {n: d for n, d in members.items() if f"/{folder}/" not in n}
    for index in ("classes.txt", "images.txt"):
        name = f"CUB_200_2011/{index}"
        lines = [line for line in members[name].decode().splitlines() if folder not in line]
        kept[name] = ("\n".join(lines) + "\n").encode()
    return kept


BAD_ARCHIVES = {
    "truncated": (lambda m, a: a.read_bytes()[: len(a.read_bytes()) * 2 // 3],
                  "truncated or damaged archive"),
    "foreign": (lambda m, a: {"images/cat.jpg": m["CUB_200_2011/images.txt"]},
                "not the CUB-200-2011 archive: no CUB_200_2011/images.txt (it holds images/cat.jpg)"),
    "missing class": (lambda m, a: _without_class(m, "200.Common_Yellowthroat"),
                      "class 200.Common_Yellowthroat of the published split is missing"),
    "zip slip": (lambda m, a: {**m, "/etc/cron.d/evil": b"* * * * * root sh"},
                 "member '/etc/cron.d/evil' points outside the archive"),
    "symlink": (lambda m, a: (m, {"CUB_200_2011/images/001.Black_footed_Albatross/x.jpg": "../../../x"}),
                "is a symbolic link"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARCHIVES))
def test_bad_archives_are_refused_in_one_line(case: str, archive: Path, tmp_path: Path):
    make, message = BAD_ARCHIVES[case]
    refuses_bad_archive(make, message, archive=archive, bad=tmp_path / "CUB_200_2011.tgz",
                        command="cub")
