"""MLflow tracking: one parent run per pipeline run, one child run per stage.

The driver creates the runs; Ray workers receive a small picklable ``TrackingContext`` and log to
their stage's run by id through ``MlflowClient`` (rank 0 only), so no worker depends on MLflow's
process-global "active run".

A tracking server that is briefly unreachable does not stop a run. Metrics that cannot be sent are
kept in memory (per process and run) and sent, in order, with the next metrics or at ``flush()``;
the stage's driver flushes before it closes the run, and training loops flush when they end. Other
calls (runs, params, tags, artifacts) are retried with backoff. Both wait at most
``VQPIPE_TRACKING_RETRY_SECONDS`` (default 120) for the server; a server that stays away then
raises ``TrackingError`` at the end of the stage, after its outputs were written and its manifest
committed to storage, so re-running only has to log again.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from pipelines.data import storage
from pipelines.errors import ConfigError, UserError

if TYPE_CHECKING:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

# MLflow is imported where it is used: a DDP rank other than 0 carries a TrackingContext but never
# logs, and its process should not pay for importing MLflow (about a second).

log = logging.getLogger("vqpipe")

MLFLOW_PARAM_LIMIT = 6000
RETRY_SECONDS_ENV = "VQPIPE_TRACKING_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 120.0
MAX_BACKOFF_SECONDS = 10.0
# Error codes that mean "the request is wrong", which waiting does not fix.
PERMANENT_ERRORS = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_DOES_NOT_EXIST",
    "RESOURCE_ALREADY_EXISTS",
    "BAD_REQUEST",
    "INVALID_STATE",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "CUSTOMER_UNAUTHORIZED",
}
# Metrics not delivered yet, per (tracking URI, run id), in the order they were logged.
_PENDING: dict[tuple[str, str], list[Metric]] = {}
# Per tracking URI: until when (monotonic) new metrics are queued without trying the server.
_QUIET_UNTIL: dict[str, float] = {}

T = TypeVar("T")


class TrackingError(UserError, RuntimeError):
    """The tracking server stayed unreachable; what was logged since is named in the message."""


def _retry_seconds() -> float:
    raw = os.environ.get(RETRY_SECONDS_ENV)
    try:
        return DEFAULT_RETRY_SECONDS if raw is None else max(float(raw), 0.0)
    except ValueError:
        raise ValueError(f"{RETRY_SECONDS_ENV}={raw!r} is not a number of seconds") from None


def _transient(exc: Exception) -> bool:
    # Not an MLflow error if this process never imported MLflow.
    errors = sys.modules.get("mlflow.exceptions")
    if errors is not None and isinstance(exc, errors.MlflowException):
        return exc.error_code not in PERMANENT_ERRORS
    return isinstance(exc, (OSError, ConnectionError, TimeoutError))


def _with_retries(what: str, tracking_uri: str, call: Callable[[], T]) -> T:
    """``call()``, retried with backoff while the server at ``tracking_uri`` is unreachable."""
    budget = _retry_seconds()
    started = time.monotonic()
    delay = 1.0
    while True:
        try:
            return call()
        except Exception as exc:
            waited = time.monotonic() - started
            if not _transient(exc):
                raise
            if waited + delay > budget:
                raise TrackingError(
                    f"MLflow server {tracking_uri} unreachable for {waited:.0f} s "
                    f"({RETRY_SECONDS_ENV}={budget:g}) while {what}: {exc}"
                ) from exc
            log.warning(
                "MLflow %s: %s failed, retrying in %.0f s: %s", tracking_uri, what, delay, exc
            )
            time.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_SECONDS)


def default_tracking_uri(output_dir: str) -> str:
    if storage.is_url(output_dir):
        raise ConfigError(
            f"output_dir {output_dir!r} is remote, so a local SQLite tracking store cannot be shared with "
            "the workers: set mlflow.tracking_uri (e.g. http://mlflow:5000)"
        )
    return "sqlite:///" + os.path.join(os.path.abspath(output_dir), "mlflow.db")


def local_artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment of a SQLite store keeps its artifacts: ``mlartifacts/`` beside the
    database file, so a local run's MLflow records and files stay together in its output_dir
    (MLflow's own default is ``./mlruns`` in whatever directory the command ran from). None for
    a tracking server, which decides for itself."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = os.path.abspath(tracking_uri[len("sqlite:///") :])
    return Path(os.path.dirname(database), "mlartifacts").as_uri()


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {'a.b.c': 'value'} as MLflow params want."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            text = json.dumps(value) if not isinstance(value, str) else value
            flat[name] = text[:MLFLOW_PARAM_LIMIT]
    return flat


@dataclass(frozen=True)
class TrackingContext:
    """Everything a worker needs to log to a stage's run. Picklable; None run_id disables logging."""

    tracking_uri: str
    run_id: str | None = None

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    def client(self) -> MlflowClient:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Send ``metrics`` (with any still pending); while the server is away, keep them queued."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        pending = _PENDING.setdefault((self.tracking_uri, self.run_id), [])
        pending.extend(batch)
        if time.monotonic() < _QUIET_UNTIL.get(self.tracking_uri, 0.0):
            return
        try:
            self._send_pending()
        except Exception as exc:
            if not _transient(exc):
                raise
            # Do not stall training on every call while the server is away: try again later.
            _QUIET_UNTIL[self.tracking_uri] = time.monotonic() + MAX_BACKOFF_SECONDS
            log.warning(
                "MLflow %s unreachable; %d metric value(s) for run %s queued: %s",
                self.tracking_uri,
                len(pending),
                self.run_id,
                exc,
            )

    def _send_pending(self) -> None:
        pending = _PENDING.get((self.tracking_uri, self.run_id), [])
        client = self.client()
        while pending:
            chunk = pending[:1000]  # MLflow caps a batch at 1000 metrics
            client.log_batch(self.run_id, metrics=chunk)
            del pending[: len(chunk)]
        _QUIET_UNTIL.pop(self.tracking_uri, None)

    def pending_metrics(self) -> int:
        """How many metric values of this run this process has not delivered yet."""
        return len(_PENDING.get((self.tracking_uri, self.run_id or ""), []))

    def flush(self, raise_on_failure: bool = True) -> None:
        """Deliver queued metrics, waiting for the server up to the retry budget.

        With ``raise_on_failure`` a server that stays away raises ``TrackingError``; without it,
        the loss is logged (training workers: their outputs are checkpoints, not metrics).
        """
        if not self.enabled or not self.pending_metrics():
            return
        count = self.pending_metrics()
        try:
            _with_retries(
                f"sending {count} queued metric value(s) of run {self.run_id}",
                self.tracking_uri,
                self._send_pending,
            )
        except TrackingError:
            if raise_on_failure:
                raise
            log.error(
                "MLflow %s: %d metric value(s) of run %s were never delivered",
                self.tracking_uri,
                self.pending_metrics(),
                self.run_id,
            )

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        flat = flatten(params)
        items = [Param(k, v) for k, v in flat.items()]
        client = self.client()
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            chunk = items[i : i + 100]
            self._retry(
                "logging params", lambda chunk=chunk: client.log_batch(self.run_id, params=chunk)
            )

    def _retry(self, what: str, call: Callable[[], T]) -> T:
        return _with_retries(f"{what} (run {self.run_id})", self.tracking_uri, call)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        if self.enabled:
            client = self.client()
            self._retry(
                f"logging artifact {os.path.basename(local_path)}",
                lambda: client.log_artifact(self.run_id, local_path, artifact_path),
            )

    def log_bytes(self, data: bytes, artifact_file: str) -> None:
        """Log in-memory bytes as an artifact at ``artifact_file`` (e.g. 'manifests/tokenize.json')."""
        if not self.enabled:
            return
        directory, name = os.path.split(artifact_file)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, name)
            with open(path, "wb") as f:
                f.write(data)
            self.log_artifact(path, directory or None)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self.log_bytes(
            json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), artifact_file
        )

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        """Log a uint8 H x W x C (or H x W) image as a PNG artifact."""
        if not self.enabled:
            return
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.asarray(image).squeeze()).save(buf, format="PNG")
        self.log_bytes(buf.getvalue(), artifact_file)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.enabled:
            client = self.client()
            for k, v in tags.items():
                self._retry(f"setting tag {k}", lambda k=k, v=v: client.set_tag(self.run_id, k, v))


class Tracker:
    """Driver-side: creates the pipeline's parent run and its stage child runs."""

    def __init__(self, tracking_uri: str, experiment: str):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        mlflow.set_tracking_uri(tracking_uri)
        found = self._retry(
            "looking up the experiment", lambda: self.client.get_experiment_by_name(experiment)
        )
        self.experiment_id = (
            found.experiment_id
            if found
            else self._retry(
                "creating the experiment",
                lambda: self.client.create_experiment(
                    experiment, artifact_location=local_artifact_location(tracking_uri)
                ),
            )
        )
        self.parent_run_id: str | None = None

    def _retry(self, what: str, call: Callable[[], T]) -> T:
        return _with_retries(what, self.tracking_uri, call)

    def _finish(self, ctx: TrackingContext, status: str) -> None:
        """Deliver the run's queued metrics, then close it with ``status``.

        When the run already failed, tracking errors are logged rather than raised, so they do
        not hide the error that ended the run.
        """
        failing = status != "FINISHED"
        try:
            ctx.flush(raise_on_failure=not failing)
        finally:
            try:
                self._retry(
                    f"closing run {ctx.run_id}",
                    lambda: self.client.set_terminated(ctx.run_id, status=status),
                )
            except TrackingError as exc:
                if not failing:
                    raise
                log.error("%s", exc)

    @contextmanager
    def pipeline_run(self, run_name: str, params: Mapping[str, Any]) -> Iterator[TrackingContext]:
        run = self._retry(
            "creating the pipeline run",
            lambda: self.client.create_run(
                self.experiment_id, run_name=run_name, tags={"vqpipe.kind": "pipeline"}
            ),
        )
        self.parent_run_id = run.info.run_id
        ctx = TrackingContext(self.tracking_uri, run.info.run_id)
        ctx.log_params(params)
        status = "FAILED"
        try:
            yield ctx
            status = "FINISHED"
        finally:
            self._finish(ctx, status)

    @contextmanager
    def stage_run(self, stage: str) -> Iterator[TrackingContext]:
        tags = {"vqpipe.kind": "stage", "vqpipe.stage": stage}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run = self._retry(
            f"creating the {stage} run",
            lambda: self.client.create_run(self.experiment_id, run_name=stage, tags=tags),
        )
        ctx = TrackingContext(self.tracking_uri, run.info.run_id)
        status = "FAILED"
        try:
            yield ctx
            status = "FINISHED"
        finally:
            self._finish(ctx, status)
