"""tieredImageNet from Ren et al.'s pickled caches and from class folders: the 351/97/160 split and
34 categories, --allow-pickle, digests, --verify, and one-line refusals."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from fake_benchmarks import evil_pickle, tiered_image, write_tiered_folders, write_tiered_pickles
from data_cli_checks import one_line_refusal, run
from pipelines import staging
from pipelines.dataset import read_manifest
from pipelines.published import published
from pipelines.tiered import _name_map

# First rows of Ren et al.'s split files (fewshot/data/tiered_imagenet_split/{train,val,test}.csv):
# (class, category).
FIRST_ROWS = {"train": ("n01530575", "n01524359"), "val": ("n02099267", "n02098550"),
              "test": ("n03314780", "n00020090")}
SIDE = 12  # the real caches hold 84x84 images; tiny ones keep the test fast


@pytest.fixture(scope="module")
def split():
    return published("tiered_imagenet")


@pytest.fixture(scope="module")
def caches(split, tmp_path_factory) -> Path:
    return write_tiered_pickles(tmp_path_factory.mktemp("tiered") / "tiered-imagenet", split.splits,
                                split.data["words"], side=SIDE)


@pytest.fixture(scope="module")
def from_caches(caches: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imports") / "tiered"
    result = run("import", "tiered-imagenet", caches, "--out", out, "--size", SIDE, "--allow-pickle")
    assert result.exit_code == 0, result.output
    assert f"tiered-imagenet, 34 superclasses, 608 classes, 608 images, 3x{SIDE}x{SIDE}" in result.output
    return out


def test_the_published_split_and_categories(from_caches: Path, caches: Path, split):
    manifest = read_manifest(from_caches)
    assert {s: (v["classes"], len(v["superclasses"])) for s, v in manifest["splits"].items()} == {
        "train": (351, 20), "val": (97, 6), "test": (160, 8)}
    rows = pq.read_table(from_caches / "images.parquet",
                         columns=["class_name", "alphabet", "split", "pixels", "source"]).to_pylist()
    by_split: dict[str, set[str]] = {}
    for row in rows:
        by_split.setdefault(row["split"], set()).add(row["class_name"])
    assert by_split == {s: set(classes) for s, classes in split.splits.items()}
    category = {r["class_name"]: r["alphabet"] for r in rows}
    for name, (wnid, group) in FIRST_ROWS.items():
        assert wnid in by_split[name] and category[wnid] == group
    # The PNG in the cache, decoded (RGB, as Pillow reads the file), is what was stored at 12x12.
    first = next(r for r in rows if r["class_name"] == FIRST_ROWS["val"][0])
    assert first["source"] == f"{caches / 'val_images_png.pkl'}#0"
    stored = np.asarray(first["pixels"], np.uint8).reshape(3, SIDE, SIDE).transpose(1, 2, 0)
    assert np.array_equal(stored, tiered_image(0, 0, SIDE))
    digests = {Path(s["path"]).name: s["sha256"] for s in manifest["sources"]}
    assert digests["train_labels.pkl"] == hashlib.sha256((caches / "train_labels.pkl").read_bytes()).hexdigest()
    assert manifest["split_rule"]["layout"] == "pickle"
    assert manifest["split_rule"]["definition"]["file"] == "pipelines/splits/tiered_imagenet.json"
    info = json.loads(run("info", from_caches, "--verify", "--json").stdout)
    assert info["verified"] is True and info["superclasses"] == 34


def test_cache_names_map_to_wordnet_ids_with_or_without_the_name_files(caches: Path, split, tmp_path):
    with_files = _name_map(caches, split)
    without = _name_map(tmp_path, split)  # no class_names.txt/synsets.txt: the data file's words
    words = split.data["words"]
    assert with_files[words["n01530575"]] == without[words["n01530575"]] == "n01530575"
    assert len({without[words[w]] for w in split.split_of()}) == 608


def test_pickles_need_permission_and_must_hold_data(caches: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "out"
    line = one_line_refusal(run("import", "tiered-imagenet", caches, "--out", out))
    assert "pickle caches are read only with --allow-pickle" in line and not out.exists()
    evil = tmp_path / "evil"
    shutil.copytree(caches, evil)
    (evil / "val_labels.pkl").write_bytes(evil_pickle())
    line = one_line_refusal(run("import", "tiered-imagenet", evil, "--out", out, "--allow-pickle"))
    assert "val_labels.pkl: the pickle asks for posix.system" in line and not out.exists()
    (evil / "val_labels.pkl").unlink()
    line = one_line_refusal(run("import", "tiered-imagenet", evil, "--out", out, "--allow-pickle"))
    assert "val_labels.pkl: missing" in line and not out.exists()
    # A truncated image cache shows only when it is read, after train's classes are staged.
    monkeypatch.setattr(staging, "PART_ROWS", 50)
    shutil.copy(caches / "val_labels.pkl", evil)
    images = (caches / "val_images_png.pkl").read_bytes()
    (evil / "val_images_png.pkl").write_bytes(images[: len(images) // 2])
    line = one_line_refusal(run("import", "tiered-imagenet", evil, "--out", out, "--allow-pickle",
                                "--size", SIDE))
    assert "val_images_png.pkl: unreadable pickle (UnpicklingError: pickle data was truncated)" in line
    assert not out.exists()


def test_class_folders(split, tmp_path: Path, from_caches: Path):
    source = write_tiered_folders(tmp_path / "tiered", split.splits, side=SIDE)
    out = tmp_path / "out"
    result = run("import", "tiered-imagenet", source, "--out", out, "--size", SIDE)
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest["split_rule"]["layout"] == "folders"
    assert manifest["splits"] == read_manifest(from_caches)["splits"]
    # A class in the wrong split, or one missing, is refused before anything is written.
    wnid = FIRST_ROWS["val"][0]
    shutil.move(source / "val" / wnid, source / "train" / wnid)
    line = one_line_refusal(run("import", "tiered-imagenet", source, "--out", tmp_path / "bad"))
    assert f"train/{wnid}: not a class of the published train split (the published split puts " \
           "it in val)" in line
    shutil.rmtree(source / "train" / wnid)
    line = one_line_refusal(run("import", "tiered-imagenet", source, "--out", tmp_path / "bad"))
    assert f"class {wnid} of the published val split is missing (1 of 97 missing)" in line
    assert not (tmp_path / "bad").exists()


def test_an_unreadable_image_leaves_nothing(split, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(staging, "PART_ROWS", 50)  # parts are staged before the bad image is met
    source = write_tiered_folders(tmp_path / "tiered", split.splits, side=SIDE)
    wnid = split.splits["test"][-1]
    (source / "test" / wnid / f"{wnid}_0.JPEG").write_bytes(b"\xff\xd8 not a JPEG")
    out = tmp_path / "out"
    line = one_line_refusal(run("import", "tiered-imagenet", source, "--out", out, "--size", SIDE))
    assert f"{wnid}_0.JPEG: not a readable PNG/JPEG image" in line
    assert not out.exists()  # the parts of the classes before it are gone too
