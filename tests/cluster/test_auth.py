"""The test cluster is multi-node and refuses clients without its token."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.cluster.services import http_status

PROBE = textwrap.dedent(
    """
    import ray
    ray.init(address="{address}", log_to_driver=False)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    print("NODES", len(nodes), int(sum(n["Resources"].get("CPU", 0) for n in nodes)))
    """
)


# A driver retries connecting to the GCS once a second, 20 times by default, whatever the error:
# a refused one gives up after this many tries instead (each one is refused for its token).
REFUSED_TRIES = 3


def _driver(cluster, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    return subprocess.run(
        [sys.executable, "-c", PROBE.format(address=cluster.address)],
        env=env | env_extra,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_three_nodes_one_cpu_each(ray_cluster):
    nodes = ray_cluster.alive_nodes()
    assert len(nodes) == 3
    assert sorted(n["resources_total"]["CPU"] for n in nodes) == [1.0, 1.0, 1.0]
    assert sum(bool(n["is_head_node"]) for n in nodes) == 1


def test_dashboard_and_job_api_need_the_token(ray_cluster):
    for path in ("/api/v0/nodes", "/api/jobs/"):
        assert http_status(ray_cluster.dashboard + path) == 401, path
        wrong = {"Authorization": "Bearer " + "0" * 64}
        assert http_status(ray_cluster.dashboard + path, wrong) == 403, path
        assert http_status(ray_cluster.dashboard + path, ray_cluster.auth_headers) == 200, path


def test_driver_with_the_token_joins(ray_cluster):
    done = _driver(ray_cluster, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": ray_cluster.token})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "NODES 3 3" in done.stdout


def test_driver_without_the_token_is_refused(ray_cluster):
    tries = {"RAY_NUM_REDIS_GET_RETRIES": str(REFUSED_TRIES)}
    done = _driver(ray_cluster, tries | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "f" * 64})
    assert done.returncode != 0 and "NODES" not in done.stdout
    assert "InvalidAuthToken" in done.stdout + done.stderr
    done = _driver(ray_cluster, tries)  # no token at all, auth not even enabled on the client
    assert done.returncode != 0 and "NODES" not in done.stdout
    assert "InvalidAuthToken" in done.stdout + done.stderr
