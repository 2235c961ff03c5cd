"""The cluster/ folder: launcher YAML and KubeRay manifest.

The YAML files are checked against Ray's own cluster-launcher schema and against the versions
pinned in pyproject.toml (Ray, torch, Python), so a version bump cannot leave them behind. The
loopback cluster (`orch cluster up`) is tested in test_multinode.py.
"""

from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"

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
    from ray.autoscaler.sdk import fillout_defaults

    config = _load("aws.yaml")
    with open(Path(ray.autoscaler.__file__).parent / "ray-schema.json") as f:
        schema = json.load(f)
    # The file as written: Ray's JSON schema (no unknown keys, right types) ...
    jsonschema.validate(config, schema)
    # ... and as `ray up` sees it: merged with the provider defaults (Ray's public SDK), validated
    # again, with the head type among the node types (what `ray up` checks beyond the schema).
    filled = fillout_defaults(copy.deepcopy(config))
    jsonschema.validate(filled, schema)
    assert filled["head_node_type"] in filled["available_node_types"]


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
