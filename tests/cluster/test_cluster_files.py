"""The cluster/ folder: launcher YAML, KubeRay manifest and the loopback cluster script.

The YAML files are checked against Ray's own cluster-launcher schema and against the versions
pinned in pyproject.toml (Ray, torch, Python), so a version bump cannot leave them behind. The
slow test starts a real two-node Ray cluster on 127.0.0.1 with cluster/local-cluster.sh, runs a
task on each node from a separate driver and checks that `stop` ends exactly its own processes.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
SCRIPT = CLUSTER / "local-cluster.sh"

# name[extras]==version, as in pyproject dependencies and pip command lines.
PIN = re.compile(r"(?<![\w.-])([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([0-9][A-Za-z0-9.*+!-]*)")
RAY_IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d{2,3})(?:-(?P<variant>[\w.-]+))?$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject() -> dict[str, Any]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _pins(strings: list[str]) -> dict[str, str]:
    pins: dict[str, str] = {}
    for s in strings:
        for name, version in PIN.findall(s):
            pins[_norm(name)] = version
    return pins


@pytest.fixture(scope="module")
def project_pins() -> dict[str, str]:
    deps = _pyproject()["project"]["dependencies"]
    pins = _pins(deps)
    assert "ray" in pins, f"pyproject.toml pins no ray version (ray[...]==X): {deps}"
    return pins


@pytest.fixture(scope="module")
def python_tag() -> str:
    """py311 for requires-python '>=3.11,<3.12'."""
    requires = _pyproject()["project"]["requires-python"]
    match = re.search(r">=\s*3\.(\d+)", requires)
    assert match, requires
    return f"py3{match.group(1)}"


def _load(name: str) -> Any:
    return yaml.safe_load((CLUSTER / name).read_text())


def _commands(config: dict[str, Any]) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    commands = [c for k in keys for c in config.get(k) or []]
    for node_type in config["available_node_types"].values():
        commands += [c for k in ("initialization_commands", "worker_setup_commands") for c in node_type.get(k) or []]
    return commands


def _check_image(image: str, ray_pin: str, python_tag: str) -> re.Match:
    match = RAY_IMAGE.match(image)
    assert match, f"{image}: not a pinned rayproject/ray:<version>-py<XY>[-variant] tag"
    assert match["ray"] == ray_pin, f"{image}: Ray {match['ray']} but pyproject pins ray=={ray_pin}"
    assert match["py"] == python_tag[2:], f"{image}: Python tag py{match['py']}, project is {python_tag}"
    return match


def _check_pins_agree(strings: list[str], project_pins: dict[str, str], where: str) -> dict[str, str]:
    found = _pins(strings)
    for name, version in found.items():
        if name in project_pins:
            assert version == project_pins[name], (
                f"{where} pins {name}=={version} but pyproject.toml pins {name}=={project_pins[name]}")
    return found


def _uncommented_keys(text: str) -> list[str]:
    """Mapping keys with no comment on their line or on the line just above."""
    lines = text.splitlines()
    missing = []
    tokens = list(yaml.scan(text))
    for token, following in zip(tokens, tokens[1:]):
        if isinstance(token, yaml.KeyToken) and isinstance(following, yaml.ScalarToken):
            n = following.start_mark.line
            above = lines[n - 1].strip() if n > 0 else ""
            if "#" not in lines[n] and not above.startswith("#"):
                missing.append(f"line {n + 1}: {lines[n].strip()}")
    return missing


# ---------------------------------------------------------------------------------------------
# cluster/aws.yaml
# ---------------------------------------------------------------------------------------------


def test_aws_yaml_passes_ray_launcher_validation():
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load("aws.yaml")
    # The file as written: Ray's JSON schema (no unknown keys, right types) ...
    with open(Path(ray.autoscaler.__file__).parent / "ray-schema.json") as f:
        jsonschema.validate(config, json.load(f))
    # ... and as `ray up` sees it: merged with the provider defaults, then validated.
    validate_config(prepare_config(copy.deepcopy(config)))


def test_aws_yaml_versions_match_pyproject(project_pins, python_tag):
    config = _load("aws.yaml")
    docker = config["docker"]
    images = [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]
    images += [t["docker"]["worker_image"] for t in config["available_node_types"].values()
               if "worker_image" in t.get("docker", {})]
    assert images
    variants = {_check_image(image, project_pins["ray"], python_tag)["variant"] for image in images}
    assert "gpu" in variants, f"no CUDA image for the GPU workers: {images}"

    found = _check_pins_agree(_commands(config), project_pins, "cluster/aws.yaml")
    assert found.get("torch") == project_pins["torch"], "setup_commands must pin torch as pyproject does"


def test_aws_yaml_nodes_and_services():
    config = _load("aws.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head node type is the CPU one"
    gpu_workers = [name for name, t in types.items()
                   if name != config["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu_workers, "a worker node type with GPUs"

    assert "/home/ray/orch" in config["file_mounts"]
    assert any("pip install" in c and "-e /home/ray/orch" in c for c in config["setup_commands"])
    head_cmds = " ".join(config["head_setup_commands"] + config["head_start_ray_commands"])
    assert "postgresql" in head_cmds and "initdb" in head_cmds and "createdb" in head_cmds
    mlflow = next(c for c in config["head_start_ray_commands"] if "mlflow server" in c)
    assert "--backend-store-uri" in mlflow and "postgresql://" in mlflow
    assert "--host 0.0.0.0" in mlflow and "--port 5000" in mlflow
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP" in c for c in config["worker_start_ray_commands"])


def test_aws_yaml_every_key_commented():
    assert _uncommented_keys((CLUSTER / "aws.yaml").read_text()) == []


# ---------------------------------------------------------------------------------------------
# cluster/kuberay.yaml
# ---------------------------------------------------------------------------------------------


def _raycluster() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((CLUSTER / "kuberay.yaml").read_text()) if d]
    clusters = [d for d in docs if d.get("kind") == "RayCluster"]
    assert len(clusters) == 1, [d.get("kind") for d in docs]
    return clusters[0]


def _containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    return group["template"]["spec"]["containers"]


def test_kuberay_raycluster_shape():
    cluster = _raycluster()
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    head = _containers(spec["headGroupSpec"])
    assert head and not any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in head)
    groups = spec["workerGroupSpecs"]
    assert groups and all(g["groupName"] for g in groups)
    gpu_groups = [g for g in groups
                  if int(_containers(g)[0].get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) >= 1]
    assert gpu_groups, "a worker group whose Ray container has an nvidia.com/gpu limit"
    for g in groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]


def test_kuberay_versions_match_pyproject(project_pins, python_tag):
    spec = _raycluster()["spec"]
    assert str(spec["rayVersion"]) == project_pins["ray"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    containers = [c for g in groups for c in _containers(g)]
    for container in containers:
        _check_image(container["image"], project_pins["ray"], python_tag)
    assert _check_image(_containers(spec["headGroupSpec"])[0]["image"], project_pins["ray"], python_tag)["variant"] is None
    strings = [s for c in containers for s in (c.get("command") or []) + (c.get("args") or [])]
    found = _check_pins_agree(strings, project_pins, "cluster/kuberay.yaml")
    assert found.get("torch") == project_pins["torch"]


def test_kuberay_every_key_commented():
    assert _uncommented_keys((CLUSTER / "kuberay.yaml").read_text()) == []


# ---------------------------------------------------------------------------------------------
# cluster/local-cluster.sh
# ---------------------------------------------------------------------------------------------


def _script_env(tmp_path: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "ORCH_LOCAL_CLUSTER_ID")}
    env.update(ORCH_PYTHON=sys.executable, ORCH_RAY_PORT=str(port), ORCH_CLUSTER_STATE=str(tmp_path / "state"),
               ORCH_RAY_TEMP_DIR=f"/tmp/orch-test-{port}", ORCH_STOP_GRACE="3")
    return env


def _run(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _free_base(nodes: int) -> int:
    """A base port in 20000-29999 (clear of Ray's default worker ports 10002-19999 and of the
    ephemeral range) whose whole block, as the script lays it out, is free."""
    for base in range(20000 + (os.getpid() % 50) * 190, 30000, 190):
        ports = [base, base + 1, base + 2] + [base + 10 + 100 * i + p for i in range(nodes) for p in range(6)]
        try:
            for p in ports:
                with socket.socket() as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind(("", p))
        except OSError:
            continue
        return base
    pytest.skip("no free port block in 20000-29999")


def test_script_syntax_and_usage(tmp_path):
    assert os.access(SCRIPT, os.X_OK)
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    env = _script_env(tmp_path, 6390)
    assert _run(["status"], env).returncode == 3          # nothing recorded
    stop = _run(["stop"], env)
    assert stop.returncode == 0 and "nothing to stop" in stop.stdout
    bad = _run(["start", "0"], env)
    assert bad.returncode != 0 and "N must be" in bad.stderr
    assert _run(["frobnicate"], env).returncode == 2


def test_start_refuses_a_busy_port(tmp_path):
    port = _free_base(1)
    env = _script_env(tmp_path, port)
    with socket.socket() as held:
        held.bind(("127.0.0.1", port))
        held.listen()
        result = _run(["start", "1"], env)
    assert result.returncode != 0 and f"in use: {port}" in result.stderr
    assert not (tmp_path / "state" / "cluster.env").exists()


def _start_time(pid: int) -> str | None:
    """Start time of a live, non-zombie process (field 22 of /proc/PID/stat), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
    found, frontier = [], {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found += sorted(frontier)
    return found


DRIVER = textwrap.dedent("""
    import json, sys
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(address=sys.argv[1], include_dashboard=False, log_to_driver=False)
    nodes = [n for n in ray.nodes() if n["Alive"]]

    @ray.remote(num_cpus=1)
    def where():
        return ray.get_runtime_context().get_node_id()

    ran_on = ray.get([where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                      .remote() for n in nodes], timeout=60)
    print(json.dumps({"alive": [[n["NodeID"], n["NodeManagerAddress"]] for n in nodes], "ran_on": ran_on}))
    ray.shutdown()
""")

OTHER_RAY = textwrap.dedent("""
    import sys, time
    import ray
    ray.init(num_cpus=1, include_dashboard=False, _temp_dir=sys.argv[1])
    print("ready", flush=True)
    time.sleep(600)
""")


@pytest.fixture
def other_ray(tmp_path) -> Iterator[subprocess.Popen]:
    """An unrelated Ray (ray.init() in another python) that `stop` must leave alone."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled")
    proc = subprocess.Popen([sys.executable, "-c", OTHER_RAY, f"/tmp/orch-other-{os.getpid()}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)   # its own session: only what the fixture started
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", f"/tmp/orch-other-{os.getpid()}"])


@pytest.mark.slow
def test_local_cluster_two_nodes_start_connect_stop(tmp_path, other_ray):
    port = _free_base(2)
    env = _script_env(tmp_path, port)
    started_at = time.monotonic()
    start = _run(["start", "2"], env, timeout=150)
    recorded: list[tuple[int, str]] = []
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        address = start.stdout.strip().splitlines()[-1]
        assert address == f"127.0.0.1:{port}"
        for line in (tmp_path / "state" / "pids").read_text().splitlines():
            pid, start_time = line.split()[0].split(":")
            recorded.append((int(pid), start_time))
        assert len(recorded) >= 4    # at least GCS and two raylets and more

        # A driver in its own process (this one may hold a Ray session already); `env` gives the
        # variables a driver needs for a loopback cluster.
        exports = dict(line.removeprefix("export ").split("=", 1) for line in _run(["env"], env).stdout.split("\n") if line)
        assert exports["RAY_ADDRESS"] == address
        probe = subprocess.run([sys.executable, "-c", DRIVER, address], env=env | exports,
                               capture_output=True, text=True, timeout=120)
        assert probe.returncode == 0, probe.stderr[-3000:]
        result = json.loads(probe.stdout.strip().splitlines()[-1])
        node_ids = [node_id for node_id, _ in result["alive"]]
        assert len(node_ids) == 2 and len(set(node_ids)) == 2
        assert {ip for _, ip in result["alive"]} == {"127.0.0.1"}
        assert sorted(result["ran_on"]) == sorted(node_ids)

        status = _run(["status"], env)
        assert status.returncode == 0 and status.stdout.count("ALIVE") == 2
        assert other_ray.stdout.readline().strip() == "ready"
        other = {pid: _start_time(pid) for pid in [other_ray.pid, *_descendants(other_ray.pid)]}
        assert len(other) >= 3     # the python, its GCS and raylet at least
    finally:
        stop = _run(["stop"], env, timeout=90)
    assert stop.returncode == 0, stop.stderr

    deadline = time.monotonic() + 10
    left = recorded
    while left and time.monotonic() < deadline:
        left = [(pid, st) for pid, st in recorded if _start_time(pid) == st]
        time.sleep(0.2)
    assert left == [], f"still running after stop: {left}"
    assert not (tmp_path / "state" / "cluster.env").exists()
    assert not Path(f"/tmp/orch-test-{port}").exists()
    # The unrelated Ray is untouched.
    assert other_ray.poll() is None
    assert {pid: _start_time(pid) for pid in other} == other
    assert time.monotonic() - started_at < 120
