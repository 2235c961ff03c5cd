"""Importing Omniglot: counts, de-duplication, alphabet splits, atomic writes."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from imagefiles import write_png
from pipelines.dataset import DatasetError, read_manifest
from pipelines.importers import import_omniglot


def test_small_zips_together_give_8_alphabets_242_characters_4840_images(omniglot_dir: Path):
    manifest = read_manifest(omniglot_dir)
    assert (manifest["alphabets"], manifest["classes"], manifest["images"]) == (8, 242, 4840)
    # Greek (24 characters) and Latin (26) are in both zips, 20 drawings each: kept once.
    assert manifest["duplicates_skipped"] == (24 + 26) * 20
    table = pq.read_table(omniglot_dir / "images.parquet")
    assert table.num_rows == 4840
    per_class = np.bincount(table.column("class_id").to_numpy())
    assert per_class.tolist() == [20] * 242
    assert len(set(zip(table.column("class_name").to_pylist(), table.column("sha256").to_pylist()))) == 4840
    assert table.schema.field("pixels").type.list_size == 28 * 28
    greek = [s for s, a in zip(table.column("source").to_pylist(), table.column("alphabet").to_pylist())
             if a == "Greek"]
    assert len(greek) == 480 and all(s.startswith("images_background_small1.zip:") for s in greek)


def test_splits_are_by_alphabet_and_disjoint(omniglot_dir: Path):
    manifest = read_manifest(omniglot_dir)
    splits = manifest["splits"]
    assert set(splits) == {"train", "val", "test"}
    alphabets = [set(splits[s]["alphabets"]) for s in splits]
    assert sum(len(a) for a in alphabets) == 8 and len(set.union(*alphabets)) == 8
    table = pq.read_table(omniglot_dir / "images.parquet", columns=["class_name", "alphabet", "split"])
    rows = table.to_pylist()
    split_of_class: dict[str, set[str]] = {}
    for row in rows:
        split_of_class.setdefault(row["class_name"], set()).add(row["split"])
        assert row["alphabet"] in splits[row["split"]]["alphabets"]
    assert all(len(s) == 1 for s in split_of_class.values())
    # A held-out alphabet large enough for 5-way episodes.
    assert splits["val"]["classes"] >= 5 and splits["test"]["classes"] >= 5
    assert manifest["split_rule"]["by"] == "alphabet"
    assert manifest["preprocessing"]["invert"] is True and manifest["preprocessing"]["size"] == 28


def test_unpacked_folder_imports_like_the_zip(omniglot_zips, tmp_path: Path):
    with zipfile.ZipFile(omniglot_zips[0]) as archive:
        archive.extractall(tmp_path / "unpacked")
    from_folder = import_omniglot([tmp_path / "unpacked" / "images_background_small1"],
                                  tmp_path / "a", size=14)
    from_zip = import_omniglot([omniglot_zips[0]], tmp_path / "b", size=14)
    assert (from_folder["alphabets"], from_folder["classes"], from_folder["images"]) == (5, 136, 2720)
    assert from_folder["splits"] == from_zip["splits"]
    a = pq.read_table(tmp_path / "a" / "images.parquet", columns=["pixels", "sha256"])
    b = pq.read_table(tmp_path / "b" / "images.parquet", columns=["pixels", "sha256"])
    assert a.equals(b)


def test_explicit_held_out_alphabets_and_seeded_draw(omniglot_zips, tmp_path: Path):
    manifest = import_omniglot(omniglot_zips[:1], tmp_path / "a", size=8,
                               val_alphabets=["Greek"], test_alphabets=["Latin", "Korean"])
    assert manifest["splits"]["val"]["alphabets"] == ["Greek"]
    assert manifest["splits"]["test"]["alphabets"] == ["Korean", "Latin"]
    with pytest.raises(DatasetError, match="unknown alphabet 'Klingon'.*found: Balinese"):
        import_omniglot(omniglot_zips[:1], tmp_path / "b", val_alphabets=["Klingon"])
    first = import_omniglot(omniglot_zips[:1], tmp_path / "c", size=8, seed=3)
    again = import_omniglot(omniglot_zips[:1], tmp_path / "d", size=8, seed=3)
    assert first["splits"] == again["splits"]


def _omniglot_tree(root: Path, alphabets: dict[str, int], drawers: int = 2) -> None:
    for alphabet, characters in alphabets.items():
        for c in range(characters):
            for d in range(drawers):
                page = np.full((105, 105), 255, np.uint8)
                page[10 + c: 40 + c, 50 + d] = 0
                write_png(root / alphabet / f"character{c + 1:02d}" / f"{c:04d}_{d + 1:02d}.png", page)


def test_evaluation_set_becomes_test_split(tmp_path: Path):
    _omniglot_tree(tmp_path / "images_background", {"Aa": 6, "Bb": 6, "Cc": 6})
    _omniglot_tree(tmp_path / "images_evaluation", {"Dd": 5})
    manifest = import_omniglot([tmp_path / "images_background", tmp_path / "images_evaluation"],
                               tmp_path / "out", size=8)
    assert manifest["splits"]["test"]["alphabets"] == ["Dd"]
    assert manifest["split_rule"]["evaluation_set_is_test"] is True
    assert len(manifest["splits"]["val"]["alphabets"]) == 1


def test_existing_import_is_kept_unless_overwrite(omniglot_zips, tmp_path: Path):
    out = tmp_path / "out"
    import_omniglot(omniglot_zips[:1], out, size=8)
    with pytest.raises(DatasetError, match="already holds an import; pass --overwrite"):
        import_omniglot(omniglot_zips[:1], out, size=8)
    manifest = import_omniglot(omniglot_zips[:1], out, size=10, overwrite=True)
    assert read_manifest(out)["shape"] == [1, 10, 10] == manifest["shape"]


def test_failed_import_leaves_nothing_and_keeps_the_old_one(tmp_path: Path):
    _omniglot_tree(tmp_path / "good", {"Aa": 6, "Bb": 6, "Cc": 6})
    out = tmp_path / "out"
    import_omniglot([tmp_path / "good"], out, size=8)
    before = (out / "manifest.json").read_text()
    _omniglot_tree(tmp_path / "bad", {"Aa": 6, "Bb": 6, "Cc": 6})
    (tmp_path / "bad" / "Cc" / "character06" / "0005_02.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError, match=r"0005_02\.png: not a readable PNG/JPEG image"):
        import_omniglot([tmp_path / "bad"], out, size=8, overwrite=True)
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in out.iterdir()) == ["images.arrow", "images.parquet", "manifest.json"]
    fresh = tmp_path / "fresh"
    with pytest.raises(DatasetError):
        import_omniglot([tmp_path / "bad"], fresh, size=8)
    assert not fresh.exists()


def test_stray_file_in_the_tree_is_named(tmp_path: Path):
    _omniglot_tree(tmp_path / "src", {"Aa": 6, "Bb": 6, "Cc": 6})
    (tmp_path / "src" / "Bb" / "notes.txt").write_text("hello")
    with pytest.raises(DatasetError) as error:
        import_omniglot([tmp_path / "src"], tmp_path / "out")
    message = str(error.value)
    assert "notes.txt: not a PNG/JPEG image" in message and "\n" not in message
