"""What a training run needs in processes other than its workers: the controller's callback and
the driver's progress board.

Ray starts a process for each: Ray Train's controller unpickles the run's callbacks, and the
progress board is an actor of its own. Each imports the module its class comes from, so this one
imports Ray and the pipeline's exceptions only, never torch, MLflow or the config models; with
them, every training run paid for those imports twice more.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import ray

from pipelines.errors import CapacityError
from pipelines.ray_compat import ControllerCallback, WorkerGroupStartupTimeoutError

# How long Ray Train waits for room for a worker group, in seconds: the setting that Ray's own
# startup-timeout error tells users to change (the test of pipelines.ray_compat checks the name).
WORKER_GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


@ray.remote(num_cpus=0)
class ProgressBoard:
    """The latest progress rank 0 reported for each phase of a run (each model it trains):
    {phase: {"phase": phase, "step": int, "figures": {name: value}}}."""

    def __init__(self) -> None:
        self.latest: dict[str | None, dict[str, Any]] = {}

    def put(self, state: dict[str, Any]) -> None:
        self.latest[state.get("phase")] = state

    def get(self) -> dict[str | None, dict[str, Any]]:
        return self.latest


def board_name(run_name: str) -> str:
    return f"vqpipe-progress-{run_name}"


def describe(amounts: Mapping[str, float]) -> str:
    """{"CPU": 2.0, "GPU": 1.0} -> "2 CPU, 1 GPU"."""
    return ", ".join(f"{v:g} {k}" for k, v in amounts.items())


class ResourceWait(ControllerCallback):
    """Bounds how long Ray Train's controller waits for room for the workers.

    Left alone, the controller waits a minute for a placement group of all workers, gives up on
    it and asks again, forever: a run whose cluster lost too many nodes hangs. This callback runs
    in the controller: it sets that wait to ``seconds`` and turns its first expiry, at the start
    or after a lost worker, into a ``CapacityError`` that ends the run. ``per_worker``: what one
    worker reserves ({"CPU": 1.0, "GPU": 1.0}).
    """

    def __init__(
        self, seconds: float, section: str, num_workers: int, per_worker: Mapping[str, float]
    ):
        self.seconds, self.section = seconds, section
        self.num_workers, self.per_worker = num_workers, dict(per_worker)

    def after_controller_start(self, train_run_context) -> None:
        # Read by each worker group the controller creates (this process is the controller's own).
        os.environ[WORKER_GROUP_START_TIMEOUT_ENV] = str(self.seconds)

    def after_controller_state_update(self, previous_state, current_state) -> None:
        error = getattr(current_state, "training_failed_error", None)
        if isinstance(getattr(error, "controller_failure", None), WorkerGroupStartupTimeoutError):
            raise CapacityError(self.message())

    def message(self) -> str:
        section, per_worker = self.section, self.per_worker
        # A run that trains several levels in turn names each one's section: "a / b".
        sections = section.split(" / ")
        workers = " / ".join(f"{s}.num_workers" for s in sections)
        cpus = " / ".join(f"{s}.cpus_per_worker" for s in sections)
        wanted = {k: v * self.num_workers for k, v in per_worker.items()}
        total, free = ray.cluster_resources(), ray.available_resources()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        return (
            f"{section}: the Ray cluster could not place {self.num_workers} training worker(s) "
            f"of {describe(per_worker)} each ({describe(wanted)} in all) within "
            f"ray.resource_wait_seconds={self.seconds:g}; it has "
            f"{describe({k: total.get(k, 0.0) for k in wanted})} on {nodes} alive node(s), "
            f"{describe({k: free.get(k, 0.0) for k in wanted})} free. Add nodes, lower "
            f"{workers} or {cpus}, or raise "
            "ray.resource_wait_seconds. The checkpoints written are kept: the same config "
            "submitted again once the cluster has room resumes from the last one"
        )


# The key of the one entry of the config that Ray Train hands the controller and each worker.
LOOP_PAYLOAD = "vqpipe.loop"


def pack_loop(loop: Any, config: dict[str, Any]) -> dict[str, bytes]:
    """The training loop and its config as bytes: the controller passes them on unread.

    Ray Train's controller unpickles the loop and its config to hand them to the workers; the
    loop's module and the config's values (readers, tracking, models' settings) import torch,
    MLflow and the pipeline's config models, in a process that never uses them."""
    from ray import cloudpickle

    return {LOOP_PAYLOAD: cloudpickle.dumps((loop, config))}


def run_packed_loop(config: dict[str, bytes]) -> None:
    """The ``train_loop_per_worker`` of every run: unpacks ``pack_loop``'s bytes and runs the loop."""
    import pickle

    loop, loop_config = pickle.loads(config[LOOP_PAYLOAD])
    loop(loop_config)
