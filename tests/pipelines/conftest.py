"""Fixtures for the data pipeline tests: the two small Omniglot zips, imported once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from imagefiles import coded_image, write_png

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "omniglot"
SMALL_ZIPS = [SHARED / "images_background_small1.zip", SHARED / "images_background_small2.zip"]


@pytest.fixture(scope="session")
def omniglot_zips() -> list[Path]:
    missing = [str(z) for z in SMALL_ZIPS if not z.exists()]
    if missing:
        pytest.skip(f"shared Omniglot zips not found: {', '.join(missing)}")
    return SMALL_ZIPS


@pytest.fixture(scope="session")
def omniglot_dir(omniglot_zips: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipelines.importers import import_omniglot

    out = tmp_path_factory.mktemp("omniglot") / "import"
    import_omniglot(omniglot_zips, out)
    return out


@pytest.fixture(autouse=True)
def single_thread():
    # Two cores shared with other jobs: torch's thread pool spins and runs tiny ops far slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
