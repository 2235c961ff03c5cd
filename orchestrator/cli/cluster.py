"""``orch cluster``: a real multi-node Ray cluster on the loopback, to try multi-node sweeps on one
machine.

    orch cluster up --nodes 2          # prints the address last: 127.0.0.1:6390
    orch cluster up --nodes 3 --distinct-hosts   # nodes on 127.0.0.1, 127.0.0.2, 127.0.0.3
    orch launch examples/quickstart.yaml --address 127.0.0.1:6390
    orch cluster status
    orch cluster down                  # ends exactly the processes `up` started

``up`` starts one supervisor process in a session of its own; it holds the nodes
(``cluster.start_loopback_cluster``) and every Ray process of theirs is its child, in its session.
``down`` asks the supervisor to shut the nodes down and then ends whatever is left in that session
-- never ``ray stop``, which would end every Ray on the machine. The state (supervisor pid and
start time, address, node ids, log) is a folder, ``~/.orch/local-cluster`` by default.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from orchestrator.services import addresses, processes
from orchestrator.config import ConfigError
from orchestrator.errors import MachineryError

DEFAULT_STATE = Path.home() / ".orch" / "local-cluster"
STATE_FILE = "cluster.json"
READY_FILE = "ready.json"
LOG_FILE = "cluster.log"
START_TIMEOUT_S = 120.0
STOP_GRACE_S = 15.0

cluster = click.Group("cluster", help="A real multi-node Ray cluster on 127.0.0.1 (up, status, down).")

_state = click.option("--state-dir", envvar="ORCH_CLUSTER_STATE", default=str(DEFAULT_STATE),
                      show_default=True, type=click.Path(file_okay=False, path_type=Path),
                      help="Where the cluster's pid, address and log are kept (or ORCH_CLUSTER_STATE).")


@cluster.command()
@click.option("--nodes", type=click.IntRange(1, 32), default=2, show_default=True,
              help="Ray nodes (the head and nodes-1 workers), each with its own raylet and object store.")
@click.option("--cpus", type=click.FloatRange(min=0), default=1, show_default=True, help="CPUs per node.")
@click.option("--port", type=click.IntRange(1024, 65535), default=6390, show_default=True,
              help="The head's GCS port, on 127.0.0.1; the address is 127.0.0.1:PORT.")
@click.option("--distinct-hosts", is_flag=True,
              help="Give each node its own loopback address (head 127.0.0.1, workers 127.0.0.2, "
                   "127.0.0.3, ...), so the nodes present as separate hosts and orch's multi-host "
                   "rules apply as on a real cluster (no SQLite, no local checkpoint folder, no "
                   "relative data.path).")
@_state
def up(nodes: int, cpus: float, port: int, distinct_hosts: bool, state_dir: Path) -> None:
    """Start NODES Ray nodes on the loopback; the last line printed is the address for --address."""
    address, node_ids = start(nodes, cpus=cpus, port=port, state_dir=state_dir,
                              distinct_hosts=distinct_hosts)
    hosts = addresses.loopback_hosts(nodes, distinct=distinct_hosts)
    for i, (node_id, host) in enumerate(zip(node_ids, hosts)):
        click.echo(f"{node_id}  {'head  ' if i == 0 else 'worker'}  {host}  CPU={cpus:g}")
    click.echo(f"local Ray cluster: {nodes} node(s); stop it with: orch cluster down", err=True)
    click.echo(address)


@cluster.command()
@_state
def status(state_dir: Path) -> None:
    """The recorded cluster: address, nodes and how many of its processes are alive."""
    state = _read_state(state_dir)
    if state is None:
        raise ConfigError(f"no local cluster recorded in {state_dir}; start one with: orch cluster up")
    alive = _processes(state)
    click.echo(f"address:    {state['address']}")
    click.echo(f"nodes:      {len(state['node_ids'])}, {state['cpus']:g} CPU each")
    click.echo(f"processes:  {len(alive)} alive (supervisor pid {state['pid']})")
    hosts = state.get("hosts") or ["127.0.0.1"] * len(state["node_ids"])
    for i, (node_id, host) in enumerate(zip(state["node_ids"], hosts)):
        click.echo(f"{node_id}  {'head  ' if i == 0 else 'worker'}  {host}  "
                   f"{'ALIVE' if alive else 'DEAD'}")
    if not processes.alive(state["pid"], state["start_time"]):
        raise MachineryError(f"the local cluster at {state['address']} is not running; "
                          "orch cluster down clears its state")


@cluster.command()
@_state
def down(state_dir: Path) -> None:
    """End exactly the processes `orch cluster up` started, and remove its state."""
    state = _read_state(state_dir)
    if state is None:
        click.echo(f"no local cluster recorded in {state_dir}; nothing to stop")
        return
    count = stop(state, state_dir)
    click.echo(f"stopped the local cluster at {state['address']} ({count} processes)")


def start(nodes: int, *, cpus: float, port: int, state_dir: Path,
          distinct_hosts: bool = False) -> tuple[str, list[str]]:
    """Start the supervisor and wait for its nodes; return the address and node ids."""
    state = _read_state(state_dir)
    if state is not None:
        if _processes(state):
            raise ConfigError(f"a local cluster is running at {state['address']} (state in {state_dir}); "
                              "stop it first: orch cluster down")
        _clear(state, state_dir)
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Ray's servers do
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise ConfigError(f"--port {port}: 127.0.0.1:{port} is in use; choose another port") from None
    state_dir.mkdir(parents=True, exist_ok=True)
    # Short and private: Ray's socket paths live under it (107 bytes at most), and its
    # ray_current_cluster file there keeps a bare ray.init() elsewhere from joining this cluster.
    temp_dir = tempfile.mkdtemp(prefix="orch-ray-", dir="/tmp")
    ray_dir = os.path.join(temp_dir, "ray")  # where Ray keeps sessions under RAY_TMPDIR
    os.mkdir(ray_dir)
    env = {**os.environ, **addresses.LOOPBACK_ENV, "RAY_TMPDIR": temp_dir,
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    env.pop("RAY_ADDRESS", None)
    (state_dir / READY_FILE).unlink(missing_ok=True)
    with open(state_dir / LOG_FILE, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli.cluster", json.dumps(dict(
                nodes=nodes, cpus=cpus, port=port, temp_dir=ray_dir, distinct_hosts=distinct_hosts,
                ready=str(state_dir / READY_FILE)))],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=Path(__file__).resolve().parents[1])
    state = dict(pid=process.pid, start_time=processes.start_time(process.pid), address=f"127.0.0.1:{port}",
                 cpus=cpus, node_ids=[], temp_dir=temp_dir,
                 hosts=addresses.loopback_hosts(nodes, distinct=distinct_hosts))
    _write_state(state, state_dir)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while not (state_dir / READY_FILE).exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise MachineryError(f"the local cluster did not start; see {state_dir / LOG_FILE}: "
                                  f"{_last_line(state_dir / LOG_FILE)}")
            time.sleep(0.2)
    except BaseException:
        stop(state, state_dir, keep_log=True)
        raise
    state["node_ids"] = json.loads((state_dir / READY_FILE).read_text())["node_ids"]
    _write_state(state, state_dir)
    return state["address"], state["node_ids"]


def stop(state: dict[str, Any], state_dir: Path, *, keep_log: bool = False) -> int:
    """SIGTERM the supervisor (it shuts its nodes down), then SIGKILL what is left of its session."""
    alive = _processes(state)
    if processes.alive(state["pid"], state["start_time"]):
        os.kill(state["pid"], signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while _processes(state) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in _processes(state):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while _processes(state) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _processes(state):
        raise MachineryError(f"processes of the local cluster did not end: {_processes(state)}")
    _clear(state, state_dir, keep_log=keep_log)
    return len(alive)


def _clear(state: dict[str, Any], state_dir: Path, *, keep_log: bool = False) -> None:
    shutil.rmtree(state["temp_dir"], ignore_errors=True)
    for name in (STATE_FILE, READY_FILE) + (() if keep_log else (LOG_FILE,)):
        (state_dir / name).unlink(missing_ok=True)


def _read_state(state_dir: Path) -> dict[str, Any] | None:
    path = state_dir / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _write_state(state: dict[str, Any], state_dir: Path) -> None:
    path = state_dir / STATE_FILE
    path.with_suffix(".tmp").write_text(json.dumps(state))
    path.with_suffix(".tmp").replace(path)


def _processes(state: dict[str, Any]) -> list[int]:
    """Live processes of the supervisor's session: it and every Ray process of its nodes."""
    return processes.in_session(state["pid"], state["start_time"])


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(empty log)"


def _serve(options: dict[str, Any]) -> None:
    """The supervisor: start the nodes, report them, hold them until SIGTERM/SIGINT."""
    from orchestrator.services.cluster import start_loopback_cluster

    def leave(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, leave)
    nodes, node_ids = None, []
    try:
        nodes, node_ids = start_loopback_cluster(options["nodes"], cpus=options["cpus"],
                                                 port=options["port"], temp_dir=options["temp_dir"],
                                                 distinct_hosts=options["distinct_hosts"])
        ready = Path(options["ready"])
        ready.with_suffix(".tmp").write_text(json.dumps({"address": nodes.address, "node_ids": node_ids}))
        ready.with_suffix(".tmp").replace(ready)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the shutdown short
        if nodes is not None:
            nodes.shutdown()


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))
