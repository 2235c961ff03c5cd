"""Fixtures for the data pipeline tests (the Omniglot import is in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagefiles import coded_image, write_png


@pytest.fixture
def coded_tree(tmp_path: Path):
    """Make a <class>/<image>.png tree of ``coded_image``s; returns its root."""

    def make(classes: int = 30, per_class: int = 20, size: int = 8, name: str = "tree") -> Path:
        root = tmp_path / name
        for c in range(classes):
            for i in range(per_class):
                write_png(root / f"c{c:02d}" / f"{i:02d}.png", coded_image(c, i, size))
        return root

    return make
