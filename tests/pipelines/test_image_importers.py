"""image-folder and mini-ImageNet importers (on small generated files)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from imagefiles import write_png
from pipelines.dataset import DatasetError, read_manifest
from pipelines.episodes import EpisodeFamily
from pipelines.importers import import_image_folder, import_mini_imagenet


def test_image_folder_splits_classes_by_seeded_ratio(coded_tree, tmp_path: Path):
    root = coded_tree(classes=25, per_class=4)
    manifest = import_image_folder(root, tmp_path / "a", size=8, grayscale=True, seed=1)
    assert (manifest["classes"], manifest["images"]) == (25, 100)
    assert {s: v["classes"] for s, v in manifest["splits"].items()} == {"train": 16, "val": 4, "test": 5}
    import_image_folder(root, tmp_path / "b", size=8, grayscale=True, seed=1)
    import_image_folder(root, tmp_path / "c", size=8, grayscale=True, seed=2)
    names = {}
    for name in "abc":
        rows = pq.read_table(tmp_path / name / "images.parquet", columns=["class_name", "split"]).to_pylist()
        names[name] = {(r["class_name"], r["split"]) for r in rows}
        assert len({c for c, _ in names[name]}) == len(names[name]) == 25  # one split per class
    assert names["a"] == names["b"] and names["a"] != names["c"]
    assert manifest["split_rule"] == {"by": "class", "seed": 1, "val_ratio": 0.16, "test_ratio": 0.2}


def test_image_folder_refuses_non_images_and_loose_files(coded_tree, tmp_path: Path):
    root = coded_tree(classes=3, per_class=2)
    (root / "c01" / "labels.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match=r"c01/labels\.csv: not a PNG/JPEG image"):
        import_image_folder(root, tmp_path / "out")
    (root / "c01" / "labels.csv").unlink()
    write_png(root / "loose.png", np.zeros((4, 4)))
    with pytest.raises(DatasetError, match=r"loose\.png: not at <class>/<image>"):
        import_image_folder(root, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def _ravi_csv(root: Path, splits: dict[str, list[str]], per_class: int = 3) -> None:
    rng = np.random.default_rng(0)
    for split, classes in splits.items():
        lines = ["filename,label"]
        for label in classes:
            for i in range(per_class):
                name = f"{label}{i:08d}.jpg"
                write_png(root / "images" / name, rng.integers(0, 255, (30, 40, 3)), mode="RGB")
                lines.append(f"{name},{label}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")


def test_mini_imagenet_csv_layout_keeps_the_ravi_split(tmp_path: Path):
    splits = {"train": ["n01", "n02", "n03"], "val": ["n04", "n05"], "test": ["n06", "n07"]}
    _ravi_csv(tmp_path / "mini", splits)
    manifest = import_mini_imagenet(tmp_path / "mini", tmp_path / "out", size=16)
    assert {s: v["classes"] for s, v in manifest["splits"].items()} == {"train": 3, "val": 2, "test": 2}
    assert manifest["shape"] == [3, 16, 16] and manifest["images"] == 21
    rows = pq.read_table(tmp_path / "out" / "images.parquet", columns=["class_name", "split"]).to_pylist()
    assert {(r["class_name"], r["split"]) for r in rows} == {(c, s) for s, cs in splits.items() for c in cs}
    task = EpisodeFamily(tmp_path / "out", ways=2, shots=1, queries=2).task("val", 0, 0)
    assert task.support_x.shape == (2, 3, 16, 16)


def test_mini_imagenet_csv_errors(tmp_path: Path):
    _ravi_csv(tmp_path / "mini", {"train": ["n01", "n02"], "val": ["n02"], "test": ["n03"]})
    with pytest.raises(DatasetError, match=r"val\.csv: line 2: class 'n02' is also in the train split"):
        import_mini_imagenet(tmp_path / "mini", tmp_path / "out")
    (tmp_path / "mini" / "val.csv").write_text("file,class\n")
    with pytest.raises(DatasetError, match=r"val\.csv: first line must be 'filename,label'"):
        import_mini_imagenet(tmp_path / "mini", tmp_path / "out")
    with pytest.raises(DatasetError, match="found neither train.csv"):
        import_mini_imagenet(tmp_path, tmp_path / "out")


def test_mini_imagenet_pickles_need_explicit_permission(tmp_path: Path):
    rng = np.random.default_rng(0)
    source = tmp_path / "mini"
    source.mkdir()
    for split, classes in {"train": ["a", "b", "c"], "val": ["d", "e"], "test": ["f", "g"]}.items():
        images = rng.integers(0, 255, (len(classes) * 4, 84, 84, 3), dtype=np.uint8)
        data = {"image_data": images,
                "class_dict": {c: list(range(4 * i, 4 * i + 4)) for i, c in enumerate(classes)}}
        with open(source / f"mini-imagenet-cache-{split}.pkl", "wb") as handle:
            pickle.dump(data, handle)
    with pytest.raises(DatasetError, match="pickle caches are read only with --allow-pickle"):
        import_mini_imagenet(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    manifest = import_mini_imagenet(source, tmp_path / "out", allow_pickle=True)
    assert (manifest["classes"], manifest["images"], manifest["shape"]) == (7, 28, [3, 84, 84])
    assert manifest["split_rule"]["layout"] == "pickle"
    rows = pq.read_table(tmp_path / "out" / "images.parquet", columns=["pixels", "source"]).to_pylist()
    first = next(r for r in rows if r["source"].endswith("cache-train.pkl#0"))
    with open(source / "mini-imagenet-cache-train.pkl", "rb") as handle:
        original = pickle.load(handle)["image_data"][0]
    assert np.array_equal(np.asarray(first["pixels"], np.uint8).reshape(3, 84, 84),
                          original.transpose(2, 0, 1))
    assert read_manifest(tmp_path / "out")["preprocessing"]["normalization"] == "train split mean/std"
