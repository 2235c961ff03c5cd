"""Joining a Ray cluster never hangs: `orch launch --address` where nothing listens fails at once
in one line, a join that does not finish fails after --connect-timeout in one line, and SIGTERM
while Ray retries the connection ends the process within seconds. Nothing is written to the
stores in any of these. Each runs `orch launch` as a user would: its own process, with no Ray
variables in the environment."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def user_env() -> dict[str, str]:
    """This environment without the Ray variables tests/conftest.py sets for in-process Ray."""
    return {k: v for k, v in os.environ.items()
            if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS", "RAY_AUTH_MODE")}


def orch(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli.main", *args]


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "name": "connect", "run_dir": str(tmp_path / "runs"),
        "training": {"iterations": 2, "eval_every": 1, "eval_tasks": 4, "meta_batch": 2},
        "workers": {"count": 0}, "search": {"trials": 1},
        "algorithms": {"maml": {"inner_lr": 0.01, "outer_lr": 0.001}}}))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mute_server() -> Iterator[tuple[int, list[socket.socket]]]:
    """A port that accepts TCP connections and never answers: what a GCS that does not respond
    looks like to Ray, which then retries for minutes."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1], accepted
    server.close()
    for connection in accepted:
        connection.close()


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


def test_nothing_listening_fails_at_once_in_one_line(sweep, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = subprocess.run(orch("launch", str(sweep), "--address", address), env=user_env(),
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == error_lines(result.stderr), result.stderr
    (line,) = error_lines(result.stderr)
    assert f"cannot reach the Ray cluster at {address}" in line and "Traceback" not in result.stderr
    assert elapsed < 60, elapsed  # imports included; the check itself takes milliseconds
    assert not (tmp_path / "runs").exists()


def test_a_join_that_does_not_finish_fails_after_the_timeout(sweep, tmp_path, mute_server):
    port, _ = mute_server
    started = time.monotonic()
    result = subprocess.run(orch("launch", str(sweep), "--address", f"127.0.0.1:{port}",
                                 "--connect-timeout", "4"), env=user_env(), cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    (line,) = error_lines(result.stderr)  # Ray's own retry warnings may come before it
    assert f"cannot join the Ray cluster at 127.0.0.1:{port} within 4 s" in line
    assert "--connect-timeout" in line and "Traceback" not in result.stderr
    assert elapsed < 60, elapsed
    assert not (tmp_path / "runs").exists()


def test_sigterm_while_connecting_ends_launch_within_10_s(sweep, tmp_path, mute_server):
    port, accepted = mute_server
    process = subprocess.Popen(orch("launch", str(sweep), "--address", f"127.0.0.1:{port}"),
                               env=user_env(), cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        # orch's reachability check is one connection; Ray's own attempts are the next ones.
        while len(accepted) < 2 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
        assert len(accepted) >= 2, "orch launch never started to join"
        time.sleep(1)
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        _, stderr = process.communicate(timeout=10)
        assert time.monotonic() - signalled < 10
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 1, stderr
    (line,) = error_lines(stderr)
    assert "interrupted" in line and "Traceback" not in stderr
    assert not (tmp_path / "runs").exists()
