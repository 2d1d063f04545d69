"""The cluster definitions parse, and what they run exists in this project."""

import importlib
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _entry_modules(text: str) -> list[str]:
    return re.findall(r"python -m (jobs\.\w+)", text)


def test_rayjob_manifest():
    doc = yaml.safe_load((REPO / "infra/kuberay/rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    modules = _entry_modules(spec["entrypoint"])
    assert modules == ["jobs.run_pipeline"]
    config = re.search(r"(configs/\S+\.yaml)", spec["entrypoint"]).group(1)
    assert (REPO / config).is_file()
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    limits = workers[0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    yaml.safe_load(spec["runtimeEnvYAML"])


def test_ray_up_cluster_config():
    doc = yaml.safe_load((REPO / "infra/ray-cluster.yaml").read_text())
    assert doc["head_node_type"] in doc["available_node_types"]
    assert doc["max_workers"] >= doc["available_node_types"]["gpu_worker"]["min_workers"]


def test_documented_entry_points_exist():
    paths = [
        REPO / "README.md",
        *sorted((REPO / "docs").glob("*.md")),
        REPO / "infra/ray-cluster.yaml",
        REPO / "infra/kuberay/rayjob.yaml",
        REPO / "infra/kuberay/raycronjob.yaml",
    ]
    texts = [p.read_text() for p in paths]
    modules = {m for t in texts for m in _entry_modules(t)}
    assert "jobs.run_pipeline" in modules
    for name in modules:
        module = importlib.import_module(name)
        assert hasattr(module, "main"), name
