"""The local MLflow store: a run's records and its artifacts stay together in its output_dir."""

from __future__ import annotations

import os

from mlflow.tracking import MlflowClient

from pipelines.tracking import Tracker, default_tracking_uri


def test_a_local_run_keeps_its_artifacts_beside_its_database(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"  # where the command runs from
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    uri = default_tracking_uri(str(output_dir))
    tracker = Tracker(uri, "demo")
    with tracker.stage_run("train_vqvae") as tracking:
        tracking.log_bytes(b"weights", "model/model.pt")
    run_id = tracking.run_id

    stored = output_dir / "mlartifacts" / run_id / "artifacts"
    assert (stored / "model" / "model.pt").read_bytes() == b"weights"
    assert os.listdir(elsewhere) == []  # no ./mlruns where the command ran
    # MLflow reads it back through the store, from any working directory.
    monkeypatch.chdir(tmp_path)
    client = MlflowClient(tracking_uri=uri)
    assert [a.path for a in client.list_artifacts(run_id, "model")] == ["model/model.pt"]
    # An experiment created before (MLflow's default location) keeps its location.
    assert Tracker(uri, "demo").experiment_id == tracker.experiment_id
