"""cluster.yaml passes Ray's own validator offline; the KubeRay RayJob manifest is well-formed.

``prepare_config`` / ``validate_config`` live in a private Ray module (docs/facts.md): pyproject pins
Ray below 3, and this test is what notices when they move.
"""

from __future__ import annotations

import copy
import os
import re

import pytest
import ray
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str) -> dict:
    with open(os.path.join(ROOT, name)) as f:
        return yaml.safe_load(f)


def _validate(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_rays_validator():
    cfg = _validate(_load("cluster.yaml"))
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0  # a CPU head
    gpu_types = [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert gpu_types and all(t["min_workers"] <= t["max_workers"] for t in gpu_types)
    assert any(re.match(r"(g5|p4d|p5)\.", t["node_config"]["InstanceType"]) for t in gpu_types)


def test_cluster_yaml_validator_rejects_unknown_keys():
    # The check above could only fail usefully if the validator is strict: show that it is.
    cfg = _load("cluster.yaml")
    cfg["max_wrokers"] = 3
    with pytest.raises(Exception, match="max_wrokers"):
        _validate(cfg)


def test_cluster_yaml_pins_this_ray_version_and_keeps_the_dashboard_on_loopback():
    cfg = _load("cluster.yaml")
    version = ray.__version__
    image = cfg["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{version}-") and "ray-ml" not in image
    setup = " ".join(cfg["setup_commands"])
    assert f"=={version}" in setup and "/home/ray/vitdit" in setup  # vitdit installed at the same Ray
    assert "/home/ray/vitdit" in cfg["file_mounts"]
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start


def test_kuberay_rayjob_names_the_pipeline_entrypoint():
    job = _load("configs/kuberay-rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    entry = job["spec"]["entrypoint"].split()
    assert entry[:3] == ["python", "-m", "jobs.pipeline"]
    assert os.path.isfile(os.path.join(ROOT, "jobs", "pipeline.py"))
    recipe = entry[3]
    assert os.path.isfile(os.path.join(ROOT, recipe)), recipe
    from pipelines.recipe import load_recipe

    load_recipe(os.path.join(ROOT, recipe))  # the recipe it runs is valid
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == ray.__version__
    containers = [spec["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        g["template"]["spec"]["containers"][0] for g in spec["workerGroupSpecs"]
    ]
    for c in containers:  # no literal credentials: they come from a Secret
        for e in c.get("env", []):
            assert "valueFrom" in e or not re.search(r"secret|password|token|key", e["name"], re.I), e
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    uri = runtime_env["env_vars"]["MLFLOW_TRACKING_URI"]
    assert "@" not in uri  # no user:password in the URI
    assert any(
        g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
        for g in spec["workerGroupSpecs"]
    )
