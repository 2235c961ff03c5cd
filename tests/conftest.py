"""Shared fixtures: a real Ray session per test module, real MLflow and Optuna stores in tmp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SMALL_ZIPS = [SHARED_DATA / "omniglot" / "images_background_small1.zip",
              SHARED_DATA / "omniglot" / "images_background_small2.zip"]

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Keep in-process Ray on 127.0.0.1 (by default it binds the machine's outward address), and let
# this process join the loopback cluster of `orch cluster up` (orch launch sets it by itself).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")
# One torch thread for the whole run, module-scoped fixtures included: two cores are shared with
# Ray's processes, and a second thread's spinning made a fixture's training 7x slower (measured:
# test_any_way's models 100 s with two threads, 14 s with one).
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ray_local():
    """One in-process Ray with 2 CPUs for the whole module (``ray.init`` takes seconds).

    ``address="local"``: a bare ``ray.init()`` joins the cluster last started on this machine
    (/tmp/ray/ray_current_cluster), such as another test's ``ray start`` processes."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=True,
             logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def omniglot_zips() -> list[Path]:
    """The two small Omniglot background zips of ../shared (read-only)."""
    missing = [str(z) for z in SMALL_ZIPS if not z.exists()]
    if missing and os.environ.get("CI") == "true":
        # In CI a skipped data suite would be a green run that tested nothing.
        pytest.fail(f"CI=true but the shared Omniglot zips are missing: {', '.join(missing)}")
    if missing:
        pytest.skip(f"shared Omniglot zips not found: {', '.join(missing)}")
    return SMALL_ZIPS


@pytest.fixture(scope="session")
def omniglot_dir(omniglot_zips: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small Omniglot zips imported once per test run, into a temporary folder."""
    from pipelines.importers import import_omniglot

    out = tmp_path_factory.mktemp("omniglot") / "import"
    import_omniglot(omniglot_zips, out)
    return out
