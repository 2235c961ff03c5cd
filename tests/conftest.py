"""Shared fixtures: a real Ray session per test module, real MLflow and Optuna stores in tmp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Keep in-process Ray on 127.0.0.1 (by default it binds the machine's outward address), and let
# tests join the loopback cluster of cluster/local-cluster.sh.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="module")
def ray_local():
    """One in-process Ray with 2 CPUs for the whole module (``ray.init`` takes seconds)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=True,
             logging_level="ERROR")
    yield ray
    ray.shutdown()
