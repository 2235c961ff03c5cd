"""A raw image file gets exactly the treatment its import recorded."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from imagefiles import write_png
from pipelines.dataset import DatasetError, open_dataset, read_manifest
from pipelines.importers import import_image_folder
from pipelines.preprocessing import normalise, preprocess_image


def stored(path: Path, row: int) -> torch.Tensor:
    dataset = open_dataset(path)
    return torch.from_numpy(normalise(dataset.pixels(np.array([row])), dataset.preprocessing))[0]


def test_raw_omniglot_file_matches_the_imported_image(omniglot_dir: Path, omniglot_zips, tmp_path: Path):
    table = pq.read_table(omniglot_dir / "images.parquet", columns=["source"])
    row = 123
    archive, member = table.column("source")[row].as_py().split(":", 1)
    with zipfile.ZipFile(omniglot_zips[0] if archive == omniglot_zips[0].name else omniglot_zips[1]) as z:
        raw = tmp_path / "raw.png"
        raw.write_bytes(z.read(member))
    preprocessing = read_manifest(omniglot_dir)["preprocessing"]
    assert Image.open(raw).size == (105, 105)
    tensor = preprocess_image(raw, preprocessing)
    assert tensor.shape == (1, 28, 28) and tensor.dtype == torch.float32
    assert torch.equal(tensor, stored(omniglot_dir, row))
    assert torch.equal(preprocess_image(Image.open(raw), preprocessing), tensor)
    # Strokes 1 on 0: the page (white in the file) is 0 after inversion.
    assert tensor[0, 0, 0] == 0 and tensor.max() == 1


def test_normalised_rgb_import_round_trips(tmp_path: Path):
    rng = np.random.default_rng(0)
    for c in range(6):
        for i in range(3):
            pixels = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
            write_png(tmp_path / "src" / f"k{c}" / f"{i}.jpg", pixels, mode="RGB")
    import_image_folder(tmp_path / "src", tmp_path / "out", size=12)
    preprocessing = read_manifest(tmp_path / "out")["preprocessing"]
    assert preprocessing["normalization"] == "train split mean/std" and preprocessing["mode"] == "RGB"
    assert preprocessing["mean"] != [0.0, 0.0, 0.0] and preprocessing["std"] != [1.0, 1.0, 1.0]
    table = pq.read_table(tmp_path / "out" / "images.parquet", columns=["source"])
    source = table.column("source")[4].as_py()
    assert torch.equal(preprocess_image(source, preprocessing), stored(tmp_path / "out", 4))
    train = torch.stack([stored(tmp_path / "out", r) for r in range(table.num_rows)
                         if r < read_manifest(tmp_path / "out")["splits"]["train"]["images"]])
    assert train.mean(dim=(0, 2, 3)).abs().max() < 1e-4  # normalised by the train split's own stats


def test_unreadable_file_is_named(tmp_path: Path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(DatasetError, match="bad.png: not a readable PNG/JPEG image"):
        preprocess_image(bad, {"mode": "L", "size": 28})
