"""MLflow tracking: one parent run per pipeline run, one child run per stage.

The driver creates the runs; Ray workers receive a small picklable ``TrackingContext`` and log to
their stage's run by id through ``MlflowClient`` (rank 0 only), so no worker depends on MLflow's
process-global "active run".
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from pipelines import storage

MLFLOW_PARAM_LIMIT = 6000


def default_tracking_uri(output_dir: str) -> str:
    if storage.is_url(output_dir):
        raise ValueError(
            f"output_dir {output_dir!r} is remote, so a local SQLite tracking store cannot be shared with "
            "the workers: set mlflow.tracking_uri (e.g. http://mlflow:5000)"
        )
    return "sqlite:///" + os.path.join(os.path.abspath(output_dir), "mlflow.db")


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
        return MlflowClient(tracking_uri=self.tracking_uri)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.enabled:
            return
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.client().log_batch(self.run_id, metrics=batch)

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        flat = flatten(params)
        items = [Param(k, v) for k, v in flat.items()]
        client = self.client()
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            client.log_batch(self.run_id, params=items[i : i + 100])

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        if self.enabled:
            self.client().log_artifact(self.run_id, local_path, artifact_path)

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
                client.set_tag(self.run_id, k, v)


class Tracker:
    """Driver-side: creates the pipeline's parent run and its stage child runs."""

    def __init__(self, tracking_uri: str, experiment: str):
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        mlflow.set_tracking_uri(tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = (
            found.experiment_id if found else self.client.create_experiment(experiment)
        )
        self.parent_run_id: str | None = None

    @contextmanager
    def pipeline_run(self, run_name: str, params: Mapping[str, Any]) -> Iterator[TrackingContext]:
        run = self.client.create_run(
            self.experiment_id, run_name=run_name, tags={"vqpipe.kind": "pipeline"}
        )
        self.parent_run_id = run.info.run_id
        ctx = TrackingContext(self.tracking_uri, run.info.run_id)
        ctx.log_params(params)
        status = "FAILED"
        try:
            yield ctx
            status = "FINISHED"
        finally:
            self.client.set_terminated(run.info.run_id, status=status)

    @contextmanager
    def stage_run(self, stage: str) -> Iterator[TrackingContext]:
        tags = {"vqpipe.kind": "stage", "vqpipe.stage": stage}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=stage, tags=tags)
        status = "FAILED"
        try:
            yield TrackingContext(self.tracking_uri, run.info.run_id)
            status = "FINISHED"
        finally:
            self.client.set_terminated(run.info.run_id, status=status)
