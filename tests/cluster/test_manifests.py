"""The cluster/ manifests parse and carry the fields Ray's launcher and KubeRay require."""

from pathlib import Path

import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


def load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def test_launcher_config_has_required_fields():
    config = load("ray-cluster.yaml")
    for key in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type", "max_workers"):
        assert key in config, key
    assert config["head_node_type"] in config["available_node_types"]
    for name, node in config["available_node_types"].items():
        assert "node_config" in node and "resources" in node, name
    workers = [n for k, n in config["available_node_types"].items() if k != config["head_node_type"]]
    assert all(n["min_workers"] <= n["max_workers"] <= config["max_workers"] for n in workers)
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert "2.60.0" in config["docker"]["image"]


def pod_containers(template):
    return template["spec"]["containers"]


def test_kuberay_raycluster():
    spec = load("kuberay/raycluster.yaml")
    assert spec["apiVersion"] == "ray.io/v1" and spec["kind"] == "RayCluster" and spec["metadata"]["name"]
    body = spec["spec"]
    assert body["rayVersion"] == "2.60.0"
    head = body["headGroupSpec"]
    assert "rayStartParams" in head and pod_containers(head["template"])[0]["image"].startswith("rayproject/ray:2.60.0")
    ports = {p["containerPort"] for p in pod_containers(head["template"])[0]["ports"]}
    assert {6379, 8265} <= ports
    for group in body["workerGroupSpecs"]:
        assert group["groupName"] and "rayStartParams" in group
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        limits = pod_containers(group["template"])[0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1"


def test_kuberay_rayjob_runs_the_neuronmap_cli_on_ray():
    spec = load("kuberay/rayjob.yaml")
    assert spec["apiVersion"] == "ray.io/v1" and spec["kind"] == "RayJob"
    body = spec["spec"]
    assert body["entrypoint"].startswith("neuronmap extract") and "--engine ray" in body["entrypoint"]
    assert yaml.safe_load(body["runtimeEnvYAML"])["pip"]["packages"]
    cluster = body["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"] is not None and cluster["workerGroupSpecs"]


def test_runtime_env_loads_through_the_submit_path(tmp_path):
    from actors.jobs import load_runtime_env

    env = load_runtime_env(CLUSTER / "runtime_env.yaml", working_dir=tmp_path)
    assert env["working_dir"] == str(tmp_path) and "pip" in env and env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
