"""What every stage receives, and the Ray session the stages share."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from pipelines.config import PipelineConfig
from pipelines.tracking import TrackingContext

log = logging.getLogger("vqpipe")


@dataclass(frozen=True)
class StageContext:
    """A stage's inputs besides the config.

    ``stage_dir`` is where the stage writes (``<output_dir>/<stage>``); ``fingerprint`` identifies the
    stage's config and upstream outputs, so partial work left by an interrupted run with the same
    fingerprint can be resumed (Ray Train run names, finished shards); ``tracking`` logs to the stage's
    MLflow child run.
    """

    cfg: PipelineConfig
    stage: str
    stage_dir: str
    fingerprint: str
    tracking: TrackingContext


def ensure_ray(cfg: PipelineConfig) -> None:
    """Join the configured cluster, or start a local Ray in this process sized to the machine."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        # `ray job submit` sets RAY_ADDRESS for the driver; the cluster's size is its own.
        log.info("joining Ray cluster at %s", address)
        ray.init(address=cfg.ray.address, log_to_driver=True)
        return
    num_cpus = cfg.ray.num_cpus or os.cpu_count() or 1
    log.info("starting a local Ray with %d CPUs", num_cpus)
    # The dashboard also serves the State API, which Ray Train's controller polls; without it
    # every training run floods the log with warnings.
    context = ray.init(
        num_cpus=num_cpus,
        object_store_memory=cfg.ray.object_store_memory,
        log_to_driver=True,
    )
    if context.dashboard_url:
        log.info("Ray dashboard: http://%s", context.dashboard_url)
