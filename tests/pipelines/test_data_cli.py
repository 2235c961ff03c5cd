"""`orch data import ...` and `orch data info`: summaries, JSON, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from orchestrator.cli.data import data


def run(*args: str):
    return CliRunner().invoke(data, [str(a) for a in args], catch_exceptions=False)


def test_import_omniglot_and_info(omniglot_zips, tmp_path: Path):
    out = tmp_path / "omniglot"
    result = run("import", "omniglot", *omniglot_zips, "--out", out, "--size", "20",
                 "--val-alphabets", "Tagalog")
    assert result.exit_code == 0, result.output
    assert "8 alphabets, 242 classes, 4,840 images" in result.output
    result = run("info", out, "--verify", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["alphabets"], info["classes"], info["images"]) == (8, 242, 4840)
    assert info["splits"]["val"]["alphabets"] == ["Tagalog"] and info["verified"] is True
    assert info["preprocessing"]["size"] == 20 and info["shape"] == [1, 20, 20]
    text = run("info", out).output
    assert "preprocessing: 20x20 L, lanczos resize, inverted" in text


def one_line_error(result) -> str:
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    return lines[0]


def test_errors_are_one_line(coded_tree, tmp_path: Path):
    root = coded_tree(classes=6, per_class=3)
    (root / "c02" / "Thumbs.db").write_bytes(b"\0\1")
    out = tmp_path / "out"
    line = one_line_error(run("import", "image-folder", root, "--out", out))
    assert "c02/Thumbs.db: not a PNG/JPEG image" in line
    assert not out.exists()  # nothing half-written
    line = one_line_error(run("info", tmp_path))
    assert f"{tmp_path}: no manifest.json" in line
    (root / "c02" / "Thumbs.db").unlink()
    assert run("import", "image-folder", root, "--out", out, "--size", "8").exit_code == 0
    parquet = out / "images.parquet"
    data = bytearray(parquet.read_bytes())
    data[100:110] = b"\xff" * 10
    parquet.write_bytes(bytes(data))
    line = one_line_error(run("info", out, "--verify"))
    assert "images.parquet: sha256" in line
    line = one_line_error(run("import", "mini-imagenet", root, "--out", tmp_path / "mini"))
    assert "found neither train.csv" in line
