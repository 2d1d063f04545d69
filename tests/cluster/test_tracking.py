"""pipelines.tracking against a real MLflow server that goes away for a while, or for good."""

from __future__ import annotations

import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from pipelines.tracking import Tracker, TrackingError
from tests.cluster.services import free_port


@pytest.fixture
def fail_fast(monkeypatch):
    """No hidden waiting inside MLflow's HTTP client: every retry is the pipeline's own."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def test_metrics_logged_while_the_server_is_down_arrive(mlflow_server, fail_fast, monkeypatch):
    # The restart itself takes 30 s on a quiet machine and minutes on a loaded one.
    monkeypatch.setenv("VQPIPE_TRACKING_RETRY_SECONDS", "600")
    tracker = Tracker(mlflow_server.url, "blink")
    with tracker.pipeline_run("blink", {"a": 1}) as parent:
        with tracker.stage_run("train_vqvae") as ctx:
            ctx.log_metrics({"train/loss": 1.0}, step=1)
            mlflow_server.service.stop()
            started = time.monotonic()
            for step in (2, 3, 4):
                ctx.log_metrics({"train/loss": 1.0 / step}, step=step)  # queued, not raised
            assert time.monotonic() - started < 30, "logging blocked while the server was down"
            assert ctx.pending_metrics() == 3
            back = threading.Thread(target=mlflow_server.restart)
            back.start()
            stopped_at = time.monotonic()
        # Closing the stage run waited for the server and delivered the queue.
        recovered = time.monotonic() - stopped_at
        back.join()
        assert ctx.pending_metrics() == 0
        parent.log_metrics({"done": 1.0})
    client = MlflowClient(tracking_uri=mlflow_server.url)
    history = client.get_metric_history(ctx.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert client.get_run(ctx.run_id).info.status == "FINISHED"
    assert client.get_run(parent.run_id).info.status == "FINISHED"
    print(f"MLflow server restarted; queued metrics delivered {recovered:.1f} s later")


def test_a_server_that_never_returns_is_a_clear_error_at_the_end(
    mlflow_server, fail_fast, monkeypatch
):
    monkeypatch.setenv("VQPIPE_TRACKING_RETRY_SECONDS", "4")
    tracker = Tracker(mlflow_server.url, "gone")
    outputs = []
    with pytest.raises(TrackingError) as info:
        with tracker.stage_run("tokenize") as ctx:
            # The server is replaced by a port where nothing listens, for good.
            object.__setattr__(ctx, "tracking_uri", f"http://127.0.0.1:{free_port()}")
            ctx.log_metrics({"samples": 24.0}, step=0)  # queued, the stage goes on
            outputs.append("manifest written")
    assert outputs == ["manifest written"]
    message = str(info.value)
    assert "unreachable" in message and "1 queued metric value" in message
    assert ctx.tracking_uri in message
