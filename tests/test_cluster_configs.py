"""The cluster configs are well-formed without a cloud: cluster.yaml against Ray's own
cluster-launcher schema plus the fields medray relies on, and the KubeRay RayJob and
RayService structurally (the RayService embeds serve/config.yaml's applications)."""

from __future__ import annotations

import copy
import importlib
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def load(rel: str) -> dict:
    return yaml.safe_load((REPO / rel).read_text())


# --- cluster.yaml (Ray cluster launcher, AWS) ---------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> dict:
    return load("cluster.yaml")


def test_cluster_yaml_passes_rays_schema(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(cluster)
    validate_config(prepare_config(copy.deepcopy(cluster)))  # merged with Ray's AWS defaults


def test_rays_schema_would_catch_a_broken_cluster_yaml(cluster):
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["ray.worker.g5"]["min_wokers"] = 1  # typo
    with pytest.raises((ValueError, jsonschema.ValidationError), match="min_wokers"):
        validate_config(broken)


def test_cluster_yaml_required_fields(cluster):
    assert cluster["cluster_name"]
    assert cluster["provider"]["type"] == "aws"
    assert cluster["provider"]["region"]
    assert cluster["auth"]["ssh_user"]
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    for name, node in types.items():
        assert {"resources", "node_config", "min_workers", "max_workers"} <= set(node), name
        assert node["node_config"]["InstanceType"], name
        assert 0 <= node["min_workers"] <= node["max_workers"], name
    assert cluster["setup_commands"] and cluster["head_start_ray_commands"]
    assert cluster["worker_start_ray_commands"]


def test_cluster_yaml_cpu_head_and_autoscaled_gpu_workers(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [n for n, t in types.items() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types, "no GPU worker type"
    instances = {types[n]["node_config"]["InstanceType"].split(".")[0] for n in gpu_types}
    assert instances & {"g5", "p4d", "p5", "g6"}
    assert all(types[n]["max_workers"] > types[n]["min_workers"] for n in gpu_types)
    assert sum(types[n]["max_workers"] for n in gpu_types) >= cluster["max_workers"] >= 1


def test_cluster_yaml_cuda_image_repo_install_iam_and_mlflow(cluster):
    docker = cluster["docker"]
    assert "gpu" in docker["image"] or "cu1" in docker["image"]
    assert "." in cluster["file_mounts"].values()  # this checkout goes to every node
    assert any("[gpu]" in cmd for cmd in cluster["worker_setup_commands"])
    assert any("pip install" in cmd for cmd in cluster["head_setup_commands"])
    for name, node in cluster["available_node_types"].items():
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    # docker.run_options apply to every node (no node type overrides them).
    assert any("MLFLOW_TRACKING_URI=" in opt for opt in docker["run_options"])
    assert all("docker" not in node for node in cluster["available_node_types"].values())
    assert {".venv", "workdir"} <= set(cluster["rsync_exclude"])


# --- KubeRay RayJob -------------------------------------------------------------------------


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _check_ray_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"].startswith("2.")
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head
    assert _containers(head)[0]["image"]
    ports = {p["containerPort"] for p in _containers(head)[0]["ports"]}
    assert 8265 in ports and 6379 in ports
    assert spec["workerGroupSpecs"]
    gpus = 0
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and "rayStartParams" in group
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for container in _containers(group):
            gpus += int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
            names = {e["name"] for e in container["env"]}
            assert "MLFLOW_TRACKING_URI" in names
    assert gpus >= 1, "no GPU worker group"


def test_rayjob_structure():
    job = load("jobs/rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    yaml.safe_load(spec["runtimeEnvYAML"])
    _check_ray_cluster_spec(spec["rayClusterSpec"])


def test_rayjob_entrypoint_runs_a_job_file_of_this_repo():
    args = shlex.split(load("jobs/rayjob.yaml")["spec"]["entrypoint"])
    assert args[0] == "python"
    image_root = "/home/ray/medray/"
    script = args[1].removeprefix(image_root)
    assert (REPO / script).is_file() and script.startswith("jobs/")
    config = args[args.index("-c") + 1].removeprefix(image_root)
    stage = Path(script).stem
    assert config == f"configs/{stage}.yaml"
    if not (REPO / config).is_file():
        pytest.skip(f"{config} not in this build yet")
    from medray.jobs_entry import stage_config

    overrides = args[args.index("-c") + 2 :]
    assert stage_config(stage, str(REPO / config), overrides).workdir.startswith("s3://")


# --- KubeRay RayService ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return load("serve/rayservice.yaml")


def _applications(rayservice: dict) -> list[dict]:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]


def test_rayservice_structure(rayservice):
    assert rayservice["apiVersion"] == "ray.io/v1" and rayservice["kind"] == "RayService"
    _check_ray_cluster_spec(rayservice["spec"]["rayClusterConfig"])
    head = _containers(rayservice["spec"]["rayClusterConfig"]["headGroupSpec"])[0]
    assert 8000 in {p["containerPort"] for p in head["ports"]}


def _keys_from_secret(pod: dict, args: dict) -> bool:
    """The API keys reach this pod from a Secret: an env var or a mounted keys file."""
    container = pod["containers"][0]
    env_name = args.get("api_keys_env", "MEDRAY_API_KEYS")
    if any(
        e["name"] == env_name and "secretKeyRef" in e.get("valueFrom", {})
        for e in container.get("env", [])
    ):
        return True
    keys_file = args.get("api_keys_file") or ""
    secrets = {v["name"] for v in pod.get("volumes", []) if "secret" in v}
    return any(
        m["name"] in secrets and keys_file.startswith(m["mountPath"].rstrip("/") + "/")
        for m in container.get("volumeMounts", [])
    )


def test_rayservice_api_keys_come_from_a_secret_on_every_pod(rayservice):
    spec = rayservice["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for app in _applications(rayservice):
        for group in groups:
            pod = group["template"]["spec"]
            assert _keys_from_secret(pod, app.get("args") or {}), group.get("groupName", "head")


def test_rayservice_applications_import_and_validate(rayservice):
    from medray.config import validate

    for app in _applications(rayservice):
        module, attr = app["import_path"].split(":")
        assert callable(getattr(importlib.import_module(module), attr))
        serve_config = importlib.import_module("medray.serving.config").ServeConfig
        validate(serve_config, app.get("args") or {}, f"rayservice {app['name']} args")


def test_rayservice_embeds_serve_config(rayservice):
    path = REPO / "serve" / "config.yaml"
    if not path.is_file():
        pytest.skip("serve/config.yaml not in this build yet")
    assert _applications(rayservice) == yaml.safe_load(path.read_text())["applications"]
