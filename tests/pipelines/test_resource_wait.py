"""A training stage whose workers the cluster cannot place fails within ray.resource_wait_seconds,
naming what it asked for and what the cluster has; it does not wait forever."""

from __future__ import annotations

import time

import pytest

from pipelines.data import storage
from pipelines.data.demo_data import generate_corpus
from pipelines.errors import CapacityError, UserError
from pipelines.stage import StageContext
from pipelines.stages import train_vqvae
from pipelines.tracking import Tracker

WAIT = 4.0


def test_workers_that_never_fit_fail_after_the_wait(ray_local, tiny_config, tmp_path):
    source = str(tmp_path / "corpus")
    generate_corpus(source, classes=["circle", "square"], images_per_class=4, image_size=16)
    # The local Ray has 2 CPUs: three workers of one CPU each never fit.
    cfg = tiny_config(
        source,
        [
            "train_vqvae.num_workers=3",
            "train_vqvae.cpus_per_worker=1",
            f"ray.resource_wait_seconds={WAIT}",
        ],
    )
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "test")
    started = time.monotonic()
    with pytest.raises(CapacityError) as info:
        with tracker.stage_run("train_vqvae") as tracking:
            stage_dir = storage.join(cfg.output_dir, "train_vqvae")
            train_vqvae.run(StageContext(cfg, "train_vqvae", stage_dir, "fp-wait", tracking))
    waited = time.monotonic() - started
    assert isinstance(info.value, UserError)
    message = str(info.value)
    assert "3 training worker(s) of 1 CPU each (3 CPU in all)" in message, message
    assert "ray.resource_wait_seconds=4" in message, message
    assert "it has 2 CPU on 1 alive node(s)" in message, message
    assert "train_vqvae.num_workers" in message, message
    assert WAIT <= waited < WAIT + 60, waited
    # Nothing was trained, so nothing was published.
    assert not storage.exists(storage.join(stage_dir, "model.pt"))
