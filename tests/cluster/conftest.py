"""Fixtures for the cluster tests: real processes, stopped by process group after the last test
of this package.

- ``s3_server``: ``moto_server`` (an S3-compatible server) on a free port, with one bucket;
- ``mlflow_server``: ``mlflow server`` with a SQLite store and artifacts proxied to that bucket;
- ``ray_cluster``: a Ray head and two worker nodes (one CPU each, own temp dirs and ports) with
  token authentication on;
- ``aws_env``: the standard AWS variables pointing this test process at the S3 server.

Everything lives under one short temporary root (Ray's Unix sockets need short paths). Services
are stopped after the last cluster test, also after failures; an ``atexit`` hook is the backstop.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.cluster import services
from tests.cluster.services import MlflowServer, RayCluster, S3Server

BUCKET = "vqpipe"
ACCESS_KEY = "AKIAVQPIPETESTKEY000"


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    mine = [here in Path(str(item.fspath)).parents for item in items]
    for item, is_mine in zip(items, mine):
        if is_mine:
            item.add_marker(pytest.mark.cluster)
    if any(mine):
        # The node-fault tests take worker nodes away for good: they run after the other cluster
        # tests (and within this package, so its services start once).
        start, end = mine.index(True), len(mine) - mine[::-1].index(True)
        block = items[start:end]
        block.sort(key=lambda item: Path(str(item.fspath)).name == "test_node_faults.py")
        items[start:end] = block


@pytest.fixture(scope="package")
def cluster_root() -> Iterator[Path]:
    base = "/tmp" if os.path.isdir("/tmp") else None
    root = Path(tempfile.mkdtemp(prefix="vqc", dir=base))
    (root / "home").mkdir()
    try:
        yield root
    finally:
        services.stop_all()
        if os.environ.get("VQPIPE_KEEP_CLUSTER_ROOT") != "1":
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="package")
def secret_key() -> str:
    """The S3 secret of this test run: random, so finding it anywhere is a real leak."""
    return "vqpipe-test-secret-" + secrets.token_hex(12)


@pytest.fixture(scope="package")
def s3_server(cluster_root: Path, secret_key: str) -> Iterator[S3Server]:
    server = services.start_s3(cluster_root, BUCKET, ACCESS_KEY, secret_key)
    try:
        _create_bucket(server)
        yield server
    finally:
        server.service.stop()


def _create_bucket(server: S3Server) -> None:
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(
        access_key=server.access_key,
        secret_key=server.secret_key,
        endpoint_override=f"127.0.0.1:{server.port}",
        scheme="http",
        region=server.region,
        allow_bucket_creation=True,
    )
    fs.create_dir(server.bucket)


@pytest.fixture(scope="package")
def aws_env(s3_server: S3Server) -> Iterator[dict[str, str]]:
    """Point this process' S3 clients (pipelines.data.storage, pyarrow) at the test server."""
    env = s3_server.env()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="package")
def job_env(s3_server: S3Server) -> dict[str, str]:
    """What a job's runtime_env passes to every worker: where the store is, no credentials."""
    env = s3_server.env()
    return {k: env[k] for k in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")}


@pytest.fixture(scope="package")
def mlflow_server(cluster_root: Path, s3_server: S3Server) -> Iterator[MlflowServer]:
    server = services.start_mlflow(cluster_root, s3_server)
    try:
        yield server
    finally:
        server.service.stop()


@pytest.fixture(scope="package")
def ray_cluster(cluster_root: Path, s3_server: S3Server) -> Iterator[RayCluster]:
    """Three nodes with token auth. The bucket's credentials are in every node's environment, as
    a Kubernetes Secret puts them in a pod's: Ray writes a job's ``runtime_env`` (env_vars
    included) to its runtime_env_agent.log, so jobs carry only the endpoint and region."""
    secrets_env = {
        k: v
        for k, v in s3_server.env().items()
        if k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    }
    cluster = services.start_ray_cluster(
        cluster_root, secrets.token_hex(32), workers=2, node_env=secrets_env
    )
    try:
        yield cluster
    finally:
        # All nodes at once: each may take its grace period to stop.
        with ThreadPoolExecutor(max_workers=len(cluster.workers) + 1) as pool:
            list(pool.map(lambda node: node.stop(), [*cluster.workers, cluster.head]))
