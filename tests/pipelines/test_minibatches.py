"""The pretraining sampler (``EpisodeFamily.minibatches``): labels over every class of a split,
epochs that show every example once, seeded shards, and the colour images' crop and flip."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from imagefiles import coded_image, write_png
from pipelines.augment import crop_and_flip
from pipelines import episodes
from pipelines.episodes import EpisodeFamily
from pipelines.importers import import_image_folder
from test_episodes import decode, split_of_class


IMAGES = 8  # per class


@pytest.fixture(scope="module")
def coded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 classes x 8 coded 8x8 images, imported without normalisation (values stay exact)."""
    root = tmp_path_factory.mktemp("minibatches")
    for c in range(20):
        for i in range(IMAGES):
            write_png(root / "tree" / f"c{c:02d}" / f"{i:02d}.png", coded_image(c, i, 8))
    import_image_folder(root / "tree", root / "coded", size=8, grayscale=True, normalize=False)
    return root / "coded"


def test_an_epoch_shows_every_example_once_with_its_class_and_turn_as_label(coded: Path):
    family = EpisodeFamily(coded, ways=5, shots=1, queries=1, rotate_splits=["train"])
    owner = split_of_class(coded)
    train_classes = sorted(c for c, split in owner.items() if split == "train")
    examples = len(train_classes) * IMAGES * 4
    assert family.class_count("train") == len(train_classes) * 4
    size = 8
    batch = family.minibatches("train", 0, range(examples // size), size=size)
    assert batch.x.shape == (examples // size, size, 1, 8, 8) and batch.y.shape == (examples // size, size)
    seen = [(decode(x), int(y)) for x, y in zip(batch.x.flatten(0, 1), batch.y.flatten())]
    assert len({example for example, _ in seen}) == examples  # each (class, image, turn) once
    for (klass, _, turns), label in seen:
        # Classes keep their order within the split; each turn is a class of its own.
        assert label == train_classes.index(klass) * 4 + turns
    # The next epoch is another order of the same examples; a shard may straddle two epochs.
    again = family.minibatches("train", 0, range(examples // size, 2 * examples // size), size=size)
    assert not torch.equal(again.y, batch.y)
    assert sorted(again.y.flatten().tolist()) == sorted(batch.y.flatten().tolist())
    straddling = family.minibatches("train", 0, [0], size=examples + 3).y[0]
    assert sorted(straddling[:examples].tolist()) == sorted(batch.y.flatten().tolist())


def test_shards_are_seeded_and_held_out_splits_are_not_rotated(coded: Path):
    family = EpisodeFamily(coded, ways=5, shots=1, queries=1, rotate_splits=["train"])
    rebuilt = pickle.loads(pickle.dumps(family))  # as a Ray worker would rebuild it
    a, b = family.minibatches("train", 3, [5, 9], size=8), rebuilt.minibatches("train", 3, [5, 9], size=8)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert torch.equal(family.minibatches("train", 3, [9], size=8).x[0], a.x[1])
    assert not torch.equal(family.minibatches("train", 4, [5, 9], size=8).y, a.y)
    val = family.minibatches("val", 0, range(4), size=8)
    assert {decode(x)[2] for x in val.x.flatten(0, 1)} == {0}
    assert int(val.y.max()) < family.class_count("val") == int((np.array(
        list(split_of_class(coded).values())) == "val").sum())


def test_colour_images_are_cropped_and_flipped_greyscale_ones_are_not(coded: Path, tmp_path: Path,
                                                                      monkeypatch):
    tree = tmp_path / "colour"
    for c in range(12):
        for i in range(6):
            grey = coded_image(c, i, 16)
            write_png(tree / f"c{c:02d}" / f"{i}.png", np.stack([grey, grey // 2, 255 - grey], -1),
                      mode="RGB")
    out = tmp_path / "colour-import"
    import_image_folder(tree, out, size=16, normalize=False)
    family = EpisodeFamily(out, ways=2, shots=1, queries=1)
    batch = family.minibatches("train", 0, range(3), size=4)
    assert batch.x.shape == (3, 4, 3, 16, 16) and batch.x.min() >= 0 and batch.x.max() <= 1
    assert torch.equal(batch.x, family.minibatches("train", 0, range(3), size=4).x)
    monkeypatch.setattr(episodes, "crop_and_flip", lambda images, generator: images)
    stored = family.minibatches("train", 0, range(3), size=4)
    assert torch.equal(stored.y, batch.y)  # the same images, augmented
    assert all(not torch.equal(a, b) for a, b in zip(stored.x.flatten(0, 1), batch.x.flatten(0, 1)))

    def refuse(images, generator):
        raise AssertionError("greyscale images must not be cropped or flipped")

    monkeypatch.setattr(episodes, "crop_and_flip", refuse)
    EpisodeFamily(coded, ways=5, shots=1, queries=1).minibatches("train", 0, [0, 1], size=4)


def test_crop_and_flip_keeps_shapes_and_is_seeded():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    first = crop_and_flip(images, torch.Generator().manual_seed(0))
    assert first.shape == images.shape
    assert torch.equal(first, crop_and_flip(images, torch.Generator().manual_seed(0)))
    outcomes = [crop_and_flip(images[:1], torch.Generator().manual_seed(s))[0] for s in range(40)]
    # Some crops are flipped: their columns run right to left.
    assert any(bool((o[:, :, 0] > o[:, :, -1]).all()) for o in outcomes)
    assert any(bool((o[:, :, 0] < o[:, :, -1]).all()) for o in outcomes)
    assert all(o.min() >= images.min() and o.max() <= images.max() for o in outcomes)
