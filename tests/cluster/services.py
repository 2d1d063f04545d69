"""Real service processes for the cluster tests: a multi-node Ray cluster with token authentication,
an S3-compatible server (moto in server mode) and an MLflow tracking server.

Every service runs in its own process group (session), so stopping one kills the whole tree it
started (a Ray node's raylet, object store and workers) and nothing else. Every port is chosen
free on 127.0.0.1 at start time; every file lives under one short temporary root.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

BIN = Path(sys.executable).parent
LIVE: list[Service] = []


_TAKEN: set[int] = set()


def free_port() -> int:
    """A free TCP port on 127.0.0.1, below the kernel's ephemeral range.

    Ports the kernel hands out for ``bind(0)`` are what Ray's own workers and outgoing connections
    get too, so a port picked that way can be taken again before the service binds it.
    """
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 32000)
        if port in _TAKEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _TAKEN.add(port)
        return port
    raise RuntimeError("no free port found in 20000-32000")


def base_env(home: Path) -> dict[str, str]:
    """The environment of a service: this one without Ray, AWS or MLflow settings, its own HOME."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_", "AWS_", "MLFLOW_", "PYTEST_")) and k != "VIRTUAL_ENV"
    }
    env["HOME"] = str(home)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Service:
    """One started process tree, with its log file."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    cwd: Path
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def start(self) -> Service:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self.cmd,
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            log.close()
        self.started_at = time.monotonic()
        LIVE.append(self)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return f"(no log at {self.log_path})"
        return "\n".join(text[-lines:])

    def _tree(self) -> list[psutil.Process]:
        """The process and every descendant, plus anything left in its session."""
        procs: dict[int, psutil.Process] = {}
        try:
            root = psutil.Process(self.pid)
            procs[root.pid] = root
            for child in root.children(recursive=True):
                procs[child.pid] = child
        except psutil.NoSuchProcess:
            pass
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getsid(p.pid) == self.pid:
                    procs[p.pid] = p
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        return list(procs.values())

    def kill(self, sig: int = signal.SIGKILL) -> list[int]:
        """Send ``sig`` to the whole tree at once (a crash, not a shutdown); returns the pids."""
        tree = self._tree()
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for p in tree:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        return [p.pid for p in tree]

    def stop(self, grace: float = 10.0) -> None:
        if self.proc is None:
            return
        tree = self._tree()
        self.kill(signal.SIGTERM)
        _, alive = psutil.wait_procs(tree, timeout=grace)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        if self in LIVE:
            LIVE.remove(self)


def stop_all() -> None:
    for service in reversed(list(LIVE)):
        try:
            service.stop(grace=5.0)
        except Exception:  # noqa: BLE001 - a backstop must try every service
            pass


atexit.register(stop_all)


def wait_until(
    check: Callable[[], Any], timeout: float, what: str, service: Service | None = None
) -> Any:
    """Poll ``check`` until it returns a truthy value; on timeout raise with the service's log."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if service is not None and service.proc is not None and not service.alive():
            raise RuntimeError(
                f"{service.name} exited with {service.proc.returncode} while waiting for {what}; "
                f"log {service.log_path}:\n{service.tail()}"
            )
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - readiness probes fail until ready
            last = exc
        time.sleep(0.5)
    log = f"; log {service.log_path}:\n{service.tail()}" if service else ""
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r}){log}")


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 5.0) -> bytes:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def http_status(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        http_get(url, headers)
        return 200
    except urllib.error.HTTPError as exc:
        return exc.code


# -- S3 ----------------------------------------------------------------------------------------


@dataclass
class S3Server:
    service: Service
    port: int
    bucket: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def restart(self) -> None:
        """Start the server again on the same port (its contents are gone: moto keeps them in memory)."""
        self.service.start()
        wait_until(self.ready, 60, "the S3 server to accept requests again", self.service)

    def ready(self) -> bool:
        return http_status(f"{self.endpoint}/moto-api/") == 200


def start_s3(root: Path, bucket: str, access_key: str, secret_key: str) -> S3Server:
    port = free_port()
    service = Service(
        name="moto_server",
        cmd=[str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        env=base_env(root / "home"),
        log_path=root / "logs" / "moto.log",
        cwd=root,
    ).start()
    server = S3Server(service, port, bucket, access_key, secret_key)
    wait_until(server.ready, 60, f"moto_server on port {port}", service)
    return server


# -- MLflow --------------------------------------------------------------------------------------


@dataclass
class MlflowServer:
    service: Service
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        return http_get(f"{self.url}/health").strip() == b"OK"

    def restart(self) -> None:
        self.service.start()
        wait_until(self.ready, 120, "the MLflow server to answer again", self.service)


def start_mlflow(root: Path, s3: S3Server) -> MlflowServer:
    port = free_port()
    env = base_env(root / "home") | s3.env() | {"MLFLOW_S3_ENDPOINT_URL": s3.endpoint}
    # The server's job runner (GenAI evaluation jobs, which the pipeline never submits) starts
    # five consumer processes that each import MLflow and poll for the server's lifetime.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    service = Service(
        name="mlflow server",
        cmd=[
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            s3.url("mlartifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        log_path=root / "logs" / "mlflow.log",
        cwd=root,
    ).start()
    server = MlflowServer(service, port)
    wait_until(server.ready, 180, f"the MLflow server on port {port}", service)
    return server


# -- Ray -----------------------------------------------------------------------------------------


@dataclass
class RayCluster:
    root: Path
    token: str
    gcs_port: int
    dashboard_port: int
    head: Service
    workers: list[Service]
    env: dict[str, str]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def alive_nodes(self) -> list[dict[str, Any]]:
        body = http_get(
            f"{self.dashboard}/api/v0/nodes?limit=100&detail=true", self.auth_headers, timeout=10
        )
        rows = json.loads(body)["data"]["result"]["result"]
        return [n for n in rows if n.get("state") == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout: float = 120) -> list[dict[str, Any]]:
        return wait_until(
            lambda: (nodes := self.alive_nodes()) and len(nodes) == count and nodes,
            timeout,
            f"{count} alive Ray node(s)",
            self.head,
        )

    def node_service(self, node: dict[str, Any]) -> Service:
        """The process tree of a node listed by ``alive_nodes``."""
        names = [k[len("node_") :] for k in node["resources_total"] if k.startswith("node_")]
        for service in [self.head, *self.workers]:
            if service.name == f"ray node {names[0] if names else '?'}":
                return service
        raise KeyError(f"no service started node {node['node_id']} ({names})")

    def add_worker(self, name: str, num_cpus: int = 1) -> Service:
        worker = start_ray_node(
            self.root, name, self.env, head_address=self.address, num_cpus=num_cpus
        )
        self.workers.append(worker)
        return worker


def _node_ports() -> list[str]:
    args = []
    for flag in (
        "--node-manager-port",
        "--object-manager-port",
        "--metrics-export-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
    ):
        args += [flag, str(free_port())]
    return args


def start_ray_node(
    root: Path,
    name: str,
    env: dict[str, str],
    *,
    head_address: str | None = None,
    num_cpus: int = 1,
    head_ports: tuple[int, int, int] | None = None,
) -> Service:
    cmd = [
        str(BIN / "ray"),
        "start",
        "--block",
        "--num-cpus",
        str(num_cpus),
        "--temp-dir",
        str(root / name),  # short on purpose: Unix socket paths are limited to ~107 bytes
        "--node-ip-address",
        "127.0.0.1",
        "--object-store-memory",
        str(120 * 1024**2),
        "--min-worker-port",
        "0",
        "--max-worker-port",
        "0",
        "--disable-usage-stats",
        "--resources",
        json.dumps({f"node_{name}": 1}),  # names the node in the State API's resources
        *_node_ports(),
    ]
    if head_address is None:
        assert head_ports is not None
        gcs, dashboard, client = head_ports
        cmd += [
            "--head",
            "--port",
            str(gcs),
            "--include-dashboard",
            "true",
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dashboard),
            "--ray-client-server-port",
            str(client),
        ]
    else:
        cmd += ["--address", head_address]
    return Service(
        name=f"ray node {name}",
        cmd=cmd,
        env=env,
        log_path=root / "logs" / f"ray-{name}.log",
        cwd=root,
    ).start()


def start_ray_cluster(
    root: Path, token: str, workers: int = 2, node_env: dict[str, str] | None = None
) -> RayCluster:
    """A head and ``workers`` worker nodes; ``node_env`` is added to every node's environment."""
    env = (
        base_env(root / "home")
        | (node_env or {})
        | {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": token,
            # Notice a dead node in seconds rather than the default half minute.
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_timeout_ms": "2000",
            "RAY_health_check_failure_threshold": "3",
            "RAY_DEDUP_LOGS": "0",
            "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        }
    )
    gcs, dashboard, client = free_port(), free_port(), free_port()
    head = start_ray_node(root, "h", env, head_ports=(gcs, dashboard, client))
    cluster = RayCluster(root, token, gcs, dashboard, head, [], env)
    wait_until(
        lambda: http_status(f"{cluster.dashboard}/api/v0/nodes", cluster.auth_headers) == 200,
        180,
        "the Ray head's dashboard",
        head,
    )
    for i in range(workers):
        cluster.add_worker(f"w{i + 1}")
    cluster.wait_for_nodes(1 + workers, timeout=180)
    return cluster
