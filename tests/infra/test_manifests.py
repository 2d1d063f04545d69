"""The cluster manifests validate strictly against the schemas their tools apply.

KubeRay's RayJob and RayCronJob CRDs (vendored under ``tests/infra/kuberay``, see its README) check
``infra/kuberay/*.yaml`` including the RayCluster spec inside them; Ray's own cluster-launcher
schema (shipped in the ``ray`` package) checks ``infra/ray-cluster.yaml``. A field the schema does
not declare is an error, so a misspelt setting cannot be silently dropped.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.infra.strict_schema import crd_schema, errors, strict_validator

REPO = Path(__file__).resolve().parents[2]
CRDS = Path(__file__).resolve().parent / "kuberay"
MANIFESTS = {
    "RayJob": (REPO / "infra/kuberay/rayjob.yaml", CRDS / "ray.io_rayjobs.yaml"),
    "RayCronJob": (REPO / "infra/kuberay/raycronjob.yaml", CRDS / "ray.io_raycronjobs.yaml"),
}
SECRET_ENV = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY)", re.IGNORECASE)


@pytest.fixture(scope="module", params=sorted(MANIFESTS))
def manifest(request) -> tuple[str, dict[str, Any], jsonschema.Draft7Validator]:
    kind = request.param
    path, crd = MANIFESTS[kind]
    return kind, yaml.safe_load(path.read_text()), strict_validator(crd_schema(crd))


def _job_spec(kind: str, doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["jobTemplate"] if kind == "RayCronJob" else doc["spec"]


def _pod_templates(kind: str, doc: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = _job_spec(kind, doc)["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


def test_manifest_validates_strictly(manifest):
    kind, doc, validator = manifest
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    assert errors(validator, doc) == []


@pytest.mark.parametrize(
    "where",
    [
        ("@job",),  # the RayJob/RayCronJob spec itself
        ("@cluster",),  # the RayCluster spec inside it
        ("@cluster", "headGroupSpec", "template", "spec", "containers", 0),  # a core/v1 Container
        ("@cluster", "authOptions"),
    ],
    ids=["job-spec", "raycluster-spec", "container", "authOptions"],
)
def test_undeclared_field_is_rejected(manifest, where):
    kind, doc, validator = manifest
    bad = copy.deepcopy(doc)
    node: Any = bad["spec"]
    for step in where:
        if step == "@job":
            node = _job_spec(kind, bad)
        elif step == "@cluster":
            node = _job_spec(kind, bad)["rayClusterSpec"]
        else:
            node = node[step]
    node["shutdownAfterJobFinishs"] = True  # a typo of a real RayJob field
    found = errors(validator, bad)
    assert len(found) == 1, found
    assert "shutdownAfterJobFinishs" in found[0] and "not allowed" in found[0]


def test_wrong_types_and_values_are_rejected(manifest):
    kind, doc, validator = manifest
    bad = copy.deepcopy(doc)
    spec = _job_spec(kind, bad)
    spec["rayClusterSpec"]["authOptions"]["mode"] = "tokens"
    spec["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "8"
    containers = _pod_templates(kind, bad)[0]["containers"]
    containers[0]["resources"]["limits"]["memory"] = "16 gigabytes"  # not a quantity
    found = "\n".join(errors(validator, bad))
    assert "'tokens' is not one of" in found
    assert "'8' is not of type 'integer'" in found
    assert "16 gigabytes" in found


def test_int_or_string_quantities_accept_both(manifest):
    kind, doc, validator = manifest
    ok = copy.deepcopy(doc)
    limits = _pod_templates(kind, ok)[1]["containers"][0]["resources"]["limits"]
    limits["nvidia.com/gpu"], limits["cpu"] = 1, "7500m"
    assert errors(validator, ok) == []


def test_token_auth_and_credentials_from_a_secret(manifest):
    kind, doc, _ = manifest
    spec = _job_spec(kind, doc)
    assert spec["rayClusterSpec"]["authOptions"]["mode"] == "token"
    for pod in _pod_templates(kind, doc):
        for container in pod["containers"]:
            refs = [
                e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e
            ]
            assert refs, f"{kind} container {container['name']} gets no Secret"
            for env in container.get("env", []):
                if SECRET_ENV.search(env["name"]):
                    assert "valueFrom" in env and "value" not in env, env["name"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    for name in runtime_env.get("env_vars", {}):
        assert not SECRET_ENV.search(name), f"{kind} runtimeEnvYAML sets {name} inline"


def test_manifest_runs_the_pipeline(manifest):
    kind, doc, _ = manifest
    spec = _job_spec(kind, doc)
    entry = spec["entrypoint"]
    assert entry.startswith("python -m jobs.run_pipeline configs/")
    config = re.search(r"(configs/\S+\.yaml)", entry).group(1)
    assert (REPO / config).is_file()
    assert spec["shutdownAfterJobFinishes"] is True


def test_cronjob_schedule_is_a_cron_expression():
    doc = yaml.safe_load(MANIFESTS["RayCronJob"][0].read_text())
    fields = doc["spec"]["schedule"].split()
    assert len(fields) == 5, doc["spec"]["schedule"]


# -- ray up -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_up_validator() -> jsonschema.Draft7Validator:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(path.read_text())
    jsonschema.validators.validator_for(schema).check_schema(schema)
    return jsonschema.validators.validator_for(schema)(schema)


def test_ray_up_config_validates_against_rays_schema(ray_up_validator):
    doc = yaml.safe_load((REPO / "infra/ray-cluster.yaml").read_text())
    assert errors(ray_up_validator, doc) == []


def test_ray_up_config_rejects_unknown_keys(ray_up_validator):
    doc = yaml.safe_load((REPO / "infra/ray-cluster.yaml").read_text())
    bad = copy.deepcopy(doc)
    bad["max_wrokers"] = 8
    found = errors(ray_up_validator, bad)
    assert found and all("max_wrokers" in e for e in found), found
    bad = copy.deepcopy(doc)
    bad["available_node_types"]["gpu_worker"]["min_wrokers"] = 8
    found = errors(ray_up_validator, bad)
    assert found and "min_wrokers" in found[0], found


def test_ray_up_config_passes_the_token_and_no_credentials():
    text = (REPO / "infra/ray-cluster.yaml").read_text()
    doc = yaml.safe_load(text)
    assert "RAY_AUTH_MODE=token" in " ".join(doc["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in " ".join(doc["worker_start_ray_commands"])
    assert not re.search(r"AWS_SECRET_ACCESS_KEY\s*[=:]\s*\S", text)
