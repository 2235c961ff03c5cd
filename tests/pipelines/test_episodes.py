"""The episode sampler: shapes, determinism, label remapping, split hygiene, damaged imports."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from orchestrator.config import ImageData
from orchestrator.training.factory import build_family
from pipelines.dataset import DatasetError, open_dataset, verify
from pipelines.episodes import EpisodeFamily
from pipelines.importers import import_image_folder


@pytest.fixture
def coded(coded_tree, tmp_path: Path) -> Path:
    """30 classes x 20 coded 8x8 images, imported without normalisation (values stay exact)."""
    out = tmp_path / "coded"
    import_image_folder(coded_tree(), out, size=8, grayscale=True, normalize=False)
    return out


def split_of_class(path: Path) -> dict[int, str]:
    table = pq.read_table(path / "images.parquet", columns=["class_name", "split"]).to_pylist()
    return {int(row["class_name"][1:]): row["split"] for row in table}


def decode(image: torch.Tensor) -> tuple[int, int, int]:
    """(class, image, quarter turns) of a coded image (see imagefiles.coded_image)."""
    pixels = np.rint(image[0].numpy() * 255).astype(int)
    for turns in range(4):
        upright = np.rot90(pixels, -turns)
        if upright[-1, -1] == 255:
            return int(upright[0, 0]), int(upright[0, 1]), turns
    raise AssertionError("not a coded image")


def test_shapes_and_types(omniglot_dir: Path):
    family = EpisodeFamily(omniglot_dir, ways=5, shots=2, queries=3)
    task = family.task("train", 0, 0)
    assert task.support_x.shape == (10, 1, 28, 28) and task.query_x.shape == (15, 1, 28, 28)
    assert task.support_x.dtype == torch.float32 and task.support_y.dtype == torch.int64
    # Strokes are 1 on a 0 background.
    assert task.support_x.min() == 0 and task.support_x.max() == 1 and task.support_x.mean() < 0.3
    batch = family.batch("val", 0, range(4))
    assert batch.support_x.shape == (4, 10, 1, 28, 28) and batch.query_y.shape == (4, 15)
    assert family.task("train", 0, 0, shots=4).support_x.shape == (20, 1, 28, 28)
    assert family.input_shape() == (1, 28, 28) and family.output_size() == 5 == family.ways


def test_same_episode_for_same_seed_and_index(omniglot_dir: Path):
    first = EpisodeFamily(omniglot_dir, ways=5, shots=1, queries=5, rotate_splits=["train"])
    second = pickle.loads(pickle.dumps(first))  # as a Ray worker would rebuild it
    for index in (0, 7):
        a, b = first.task("train", 3, index), second.task("train", 3, index)
        for x, y in zip((a.support_x, a.support_y, a.query_x, a.query_y),
                        (b.support_x, b.support_y, b.query_x, b.query_y)):
            assert torch.equal(x, y)
    assert not torch.equal(first.task("train", 3, 0).query_x, first.task("train", 3, 1).query_x)
    assert not torch.equal(first.task("train", 3, 0).query_x, first.task("train", 4, 0).query_x)


def test_labels_are_remapped_in_random_order(coded: Path):
    family = EpisodeFamily(coded, ways=5, shots=2, queries=3)
    first_labels = []
    for index in range(40):
        task = family.task("train", 0, index)
        assert task.support_y.tolist() == [i for i in range(5) for _ in range(2)]
        assert task.query_y.tolist() == [i for i in range(5) for _ in range(3)]
        classes_of_label: dict[int, set[int]] = {}
        images: set[tuple[int, int]] = set()
        for x, y in zip(torch.cat([task.support_x, task.query_x]),
                        torch.cat([task.support_y, task.query_y])):
            klass, image, _ = decode(x)
            classes_of_label.setdefault(int(y), set()).add(klass)
            images.add((klass, image))
        assert all(len(c) == 1 for c in classes_of_label.values())  # one class per label
        order = [next(iter(classes_of_label[label])) for label in range(5)]
        assert len(set(order)) == 5  # N different classes
        assert len(images) == 25  # no image twice in an episode
        first_labels.append(order)
    assert any(order != sorted(order) for order in first_labels)
    assert len({order[0] for order in first_labels}) > 5


def test_no_class_leaks_across_splits(coded: Path):
    family = EpisodeFamily(coded, ways=5, shots=1, queries=2)
    owner = split_of_class(coded)
    seen: dict[str, set[int]] = {}
    for split in ("train", "val", "test"):
        for index in range(30):
            task = family.task(split, 0, index)
            for x in torch.cat([task.support_x, task.query_x]):
                klass, _, _ = decode(x)
                assert owner[klass] == split
                seen.setdefault(split, set()).add(klass)
    assert not (seen["train"] & seen["val"]) and not (seen["train"] & seen["test"])
    assert not (seen["val"] & seen["test"])


def test_rotations_only_in_the_training_split(coded: Path):
    family = EpisodeFamily(coded, ways=5, shots=1, queries=1, rotate_splits=["train"])
    turns = {split: {decode(x)[2] for i in range(30) for x in family.task(split, 0, i).query_x}
             for split in ("train", "val")}
    assert turns["train"] == {0, 1, 2, 3} and turns["val"] == {0}


def test_built_from_config_and_checks(coded: Path):
    family = build_family(ImageData(path=str(coded), ways=5, shots=1, queries=5,
                                    augment_rotations=True))
    assert family.rotate_splits == {"train"} and family.preprocessing()["size"] == 8
    assert family.fingerprint_spec()["ways"] == 5
    with pytest.raises(DatasetError, match="imported at 8x8 pixels but data.image_size is 28"):
        EpisodeFamily(coded, image_size=28)
    with pytest.raises(DatasetError, match="no split 'holdout'; this import has train, val, test"):
        EpisodeFamily(coded).task("holdout", 0, 0)
    with pytest.raises(DatasetError, match="fewer than ways=6"):
        EpisodeFamily(coded, ways=6).task("val", 0, 0)
    with pytest.raises(DatasetError, match="fewer than shots \\+ queries = 21"):
        EpisodeFamily(coded, shots=1, queries=20).task("train", 0, 0)


def test_pixels_are_read_through_a_memory_map(omniglot_dir: Path):
    dataset = open_dataset(omniglot_dir)
    assert isinstance(dataset._mmap, pa.MemoryMappedFile)
    assert all(not c.flags.owndata and not c.flags.writeable for c in dataset._chunks)
    rows = np.array([0, 5, 4839])
    table = pq.read_table(omniglot_dir / "images.parquet", columns=["pixels"])
    expected = np.stack([np.asarray(table.column("pixels")[int(r)].as_py(), np.uint8) for r in rows])
    assert np.array_equal(dataset.pixels(rows).reshape(3, -1), expected)


def _copy(source: Path, target: Path) -> Path:
    target.mkdir()
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def _one_line_error(path: Path, *, checksums: bool = False) -> str:
    with pytest.raises(DatasetError) as error:
        if checksums:
            verify(path)
        else:
            EpisodeFamily(path)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_truncated_or_corrupt_files_give_one_line_errors(coded: Path, tmp_path: Path):
    truncated = _copy(coded, tmp_path / "truncated")
    data = (truncated / "images.parquet").read_bytes()
    (truncated / "images.parquet").write_bytes(data[: len(data) // 2])
    assert "images.parquet" in _one_line_error(truncated)

    footer = _copy(coded, tmp_path / "footer")
    data = bytearray((footer / "images.parquet").read_bytes())
    data[-64:] = b"\0" * 64  # same size, footer destroyed
    (footer / "images.parquet").write_bytes(bytes(data))
    assert "images.parquet: not a readable Parquet file" in _one_line_error(footer)

    middle = _copy(coded, tmp_path / "middle")
    data = bytearray((middle / "images.parquet").read_bytes())
    data[len(data) // 2: len(data) // 2 + 16] = b"\xff" * 16
    (middle / "images.parquet").write_bytes(bytes(data))
    message = _one_line_error(middle, checksums=True)
    assert "images.parquet: sha256" in message and "does not match" in message

    arrow = _copy(coded, tmp_path / "arrow")
    (arrow / "images.arrow").write_bytes((arrow / "images.arrow").read_bytes()[:1000])
    assert "images.arrow" in _one_line_error(arrow)


def test_folders_that_are_not_complete_imports_are_refused(coded: Path, tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no manifest.json; not a complete orch import" in _one_line_error(empty)
    partial = _copy(coded, tmp_path / "partial")
    (partial / "manifest.json").unlink()
    assert "an unfinished import (no manifest.json)" in _one_line_error(partial)
    assert "no such folder" in _one_line_error(tmp_path / "nowhere")


def test_the_task_fingerprint_follows_content_not_path(coded_tree, tmp_path: Path):
    """A moved or copied import keeps its champion comparable; another import written to the
    same path does not (the registry compares champions on this fingerprint)."""
    import shutil

    from orchestrator.config import sweep_from_dict

    def fingerprint(path: Path) -> str:
        return sweep_from_dict({"name": "f", "data": {"family": "images", "path": str(path)},
                                "model": {"backbone": "conv4"},
                                "algorithms": {"protonet": {}}}).task_fingerprint()

    original = tmp_path / "import"
    import_image_folder(coded_tree(classes=12, per_class=6), original, size=8, grayscale=True)
    moved = tmp_path / "elsewhere" / "moved"
    shutil.copytree(original, moved)
    assert fingerprint(moved) == fingerprint(original)

    before = fingerprint(original)
    shutil.rmtree(original)
    import_image_folder(coded_tree(classes=12, per_class=7, name="other"), original, size=8,
                        grayscale=True)
    assert fingerprint(original) != before
