"""Fixtures for the learner tests: the two small Omniglot zips, imported once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
