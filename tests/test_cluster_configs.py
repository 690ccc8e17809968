"""The cluster definitions in cluster/: validated offline, as `ray up` would, before any cloud.

Launcher YAMLs go through Ray's own `prepare_config` + `validate_config` (the schema that
ships in the Ray wheel, `ray/autoscaler/ray-schema.json`); neither needs credentials or
network. The KubeRay manifest has no schema in the wheel, so its structure is checked here.
Every Ray version named anywhere must satisfy pyproject.toml's Ray requirement.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER_FILES = ["gpu.yaml", "gcp-gpu.yaml"]
IMAGE_VERSION = re.compile(r"rayproject/ray:(\d+\.\d+\.\d+)")
PIP_RAY = re.compile(r"ray\[[^\]]*\]==(\d+\.\d+\.\d+)")


def pyproject_ray() -> SpecifierSet:
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'"ray\[[^\]]*\]([^"]*)"', text)
    assert match, "pyproject.toml names no ray[...] dependency"
    return SpecifierSet(match.group(1))


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def validate_launcher(config: dict) -> dict:
    """What `ray up` does before it touches the cloud: fill defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def launcher_ray_versions(config: dict) -> set[str]:
    commands = " ".join(
        config.get("setup_commands", [])
        + config.get("head_setup_commands", [])
        + config.get("worker_setup_commands", [])
    )
    versions = set(PIP_RAY.findall(commands))
    versions.update(IMAGE_VERSION.findall(str(config.get("docker", {}))))
    return versions


# --------------------------------------------------------------------------- launcher YAMLs


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_yaml_passes_rays_own_validation(name):
    prepared = validate_launcher(load(name))
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_installs_distmed_with_the_pyproject_ray_version(name):
    config = load(name)
    versions = launcher_ray_versions(config)
    assert len(versions) == 1, f"{name}: one Ray version everywhere, found {versions}"
    assert Version(versions.pop()) in pyproject_ray()
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "~/distmed" in setup
    assert config["file_mounts"]["~/distmed"] == "."
    assert "**/.venv" in config["rsync_exclude"]  # never ship a local environment


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_gpu_workers_scale_from_zero_and_head_has_no_gpu(name):
    config = load(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types
    assert all(t["min_workers"] == 0 for t in gpu_types)
    # distmed counts each type at its own maximum; the global cap must not be lower.
    assert config["max_workers"] >= sum(t["max_workers"] for t in gpu_types)
    assert config["idle_timeout_minutes"] > 0


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_dashboard_is_local_only_and_auth_is_on(name):
    config = load(name)
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert "RAY_AUTH_MODE=token" in " ".join(commands)
    assert "~/.ray/auth_token" in config["file_mounts"]


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        (lambda c: c.update(max_wrokers=4), jsonschema.ValidationError),  # misspelt key
        (lambda c: c.update(max_workers="four"), jsonschema.ValidationError),
        (
            lambda c: c["available_node_types"]["gpu_1x"]["resources"].update(GPU=0.5),
            jsonschema.ValidationError,  # node resources are whole numbers
        ),
        (
            lambda c: c["available_node_types"]["gpu_1x"].pop("node_config"),
            jsonschema.ValidationError,
        ),
        (lambda c: c.update(head_node_type="no_such_type"), ValueError),
    ],
)
def test_a_broken_launcher_copy_fails(tmp_path: Path, edit, error):
    config = load("gpu.yaml")
    edit(config)
    broken = tmp_path / "gpu.yaml"
    broken.write_text(yaml.safe_dump(config))
    with pytest.raises(error):
        validate_launcher(yaml.safe_load(broken.read_text()))


def test_a_launcher_copy_with_another_ray_fails_the_version_check():
    config = load("gpu.yaml")
    config["setup_commands"] = [
        c.replace("ray[default,train,tune]==2.60.0", "ray[default,train,tune]==2.59.0")
        for c in config["setup_commands"]
    ]
    assert launcher_ray_versions(config) == {"2.59.0", "2.60.0"}


# --------------------------------------------------------------------------- KubeRay


def kuberay_problems(manifest: dict) -> list[str]:
    """Structural problems of a KubeRay RayCluster for distmed; empty when it is fine."""
    problems = []
    if manifest.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion {manifest.get('apiVersion')!r} is not ray.io/v1")
    if manifest.get("kind") not in ("RayCluster", "RayJob"):
        problems.append(f"kind {manifest.get('kind')!r} is not RayCluster or RayJob")
    spec = manifest.get("spec") or {}
    if manifest.get("kind") == "RayJob":
        spec = spec.get("rayClusterSpec") or {}
    version = str(spec.get("rayVersion", ""))
    if not version or Version(version) not in pyproject_ray():
        problems.append(f"rayVersion {version!r} does not satisfy pyproject's {pyproject_ray()}")
    head = (spec.get("headGroupSpec") or {}).get("template", {}).get("spec", {})
    groups = spec.get("workerGroupSpecs") or []
    pods = [head] + [g.get("template", {}).get("spec", {}) for g in groups]
    containers = [c for pod in pods for c in pod.get("containers") or []]
    if not head.get("containers"):
        problems.append("headGroupSpec has no container")
    for container in containers:
        if f"ray{version}" not in container.get("image", "").rpartition(":")[2]:
            problems.append(f"image {container.get('image')!r} is not tagged ray{version}")
    gpu_groups = [
        g
        for g in groups
        for c in g.get("template", {}).get("spec", {}).get("containers") or []
        if int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) >= 1
    ]
    if not gpu_groups:
        problems.append("no worker group with an nvidia.com/gpu limit")
    if any(g.get("minReplicas", 1) != 0 for g in gpu_groups):
        problems.append("GPU worker groups must scale from minReplicas 0")
    return problems


def test_kuberay_manifest_structure():
    manifest = load("kuberay.yaml")
    assert kuberay_problems(manifest) == []
    assert manifest["spec"]["enableInTreeAutoscaling"] is True


def test_kuberay_image_is_built_on_the_same_ray():
    version = load("kuberay.yaml")["spec"]["rayVersion"]
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert IMAGE_VERSION.findall(dockerfile) == [version]
    assert f"ray[default,train,tune]=={version}" in dockerfile


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda m: m.update(apiVersion="ray.io/v1alpha1"), "apiVersion"),
        (lambda m: m["spec"].update(rayVersion="2.59.0"), "rayVersion"),
        (lambda m: m["spec"]["workerGroupSpecs"][0].update(minReplicas=1), "minReplicas 0"),
        (
            lambda m: m["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
                "resources"
            ]["limits"].pop("nvidia.com/gpu"),
            "nvidia.com/gpu",
        ),
        (
            lambda m: m["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
                image="rayproject/ray:2.59.0-gpu"
            ),
            "is not tagged",
        ),
    ],
)
def test_a_broken_kuberay_copy_fails(tmp_path: Path, edit, problem):
    manifest = load("kuberay.yaml")
    edit(manifest)
    broken = tmp_path / "kuberay.yaml"
    broken.write_text(yaml.safe_dump(manifest))
    problems = kuberay_problems(yaml.safe_load(broken.read_text()))
    assert any(problem in p for p in problems), problems


def test_every_cluster_yaml_is_covered():
    names = {p.name for p in CLUSTER.glob("*.yaml")}
    assert names == {*LAUNCHER_FILES, "kuberay.yaml"}
