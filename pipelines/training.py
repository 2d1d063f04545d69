"""The training loop the two training stages share, on Ray Train.

A stage supplies a model, a loss function and (optionally) a held-out evaluation; this module does
everything else the same way for the autoencoder and for each prior:

- driver side, ``run_trainer`` builds the TorchTrainer from the stage's ``TrainingKnobs`` (workers,
  CPUs/GPUs, failures allowed, checkpoints kept) with a run name and storage path that make a second
  run of the same job resume the first one;
- worker side, ``fit`` reads like single-process PyTorch: prepare the model (DDP when there is more
  than one worker), Adam, a step-based loop over epochs of this worker's data (an
  ``pipelines.data.epochs.EpochReader``: seeded, per rank, the same batches whatever the load), metrics
  to MLflow from rank 0, evaluation on rank 0, and ``ray.train.report`` with a checkpoint every
  ``checkpoint_every`` steps and at the end.

A Ray Train checkpoint is a folder with ``model.pt`` (the vq_core checkpoint format, so any
checkpoint doubles as a usable model) and ``optimizer.pt`` (Adam's state). Resuming restores both and
continues from the saved step, at the saved epoch and batch; it does not restart the schedule.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from functools import partial
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, ControllerError, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch import nn

from pipelines import console, interrupts
from pipelines.checkpoint_meta import (
    CheckpointMeta,
    checkpoint_bytes,
    load_with_meta,
    save_with_meta,
)
from pipelines.config import RaySection, TrainingKnobs
from pipelines.data import storage
from pipelines.data.epochs import EpochReader
from pipelines.errors import CapacityError
from pipelines.ray_compat import DatasetsCallback, PlacementGroupCleanerCallback
from pipelines.tracking import TrackingContext
from pipelines.train_control import (
    ProgressBoard,
    ResourceWait,
    board_name,
    pack_loop,
    run_packed_loop,
)
from vq_core.checkpoint import unwrap_model
from vq_core.recompute import set_activation_checkpointing

log = logging.getLogger("vqpipe")

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
# The weights with the best held-out score so far (when the stage selects on one), kept in every
# checkpoint so that resuming does not forget them.
BEST_FILE = "best.pt"
# The checkpoint metadata (``ray.train.Checkpoint.get_metadata``) naming the level whose model a
# checkpoint holds (None for a one-model run): a run that trains the levels in turn resumes each
# from its own checkpoints only.
LEVEL_KEY = "level"

# loss_fn(model, batch, step) -> (loss to back-propagate, named scalars to log). `model` is what
# prepare_model returned: call it (not its methods) so DDP sees the forward pass.
LossFn = Callable[
    [nn.Module, dict[str, torch.Tensor], int], tuple[torch.Tensor, dict[str, torch.Tensor]]
]
# evaluate_fn(bare model, device) -> named floats; runs on rank 0 only, in eval mode, without autograd.
EvaluateFn = Callable[[nn.Module, torch.device], dict[str, float]]


class InjectedFailure(RuntimeError):
    """Raised by ``fail_at_step``: a stand-in for a lost worker in resume tests."""


# -------------------------------------------------------------------------------------------------
# Progress, from rank 0 back to the console of the driver
#
# The driver starts a small named actor per run; rank 0 looks it up by the run's name and leaves
# its latest step and loss there (fire and forget, at most every REPORT_SECONDS); a driver thread
# reads it. A restarted worker finds the same actor; on a cluster the actor stays on the driver's
# node. Progress is best effort: a lost actor never stops training.

REPORT_SECONDS = 1.0
POLL_SECONDS = 0.5


@contextmanager
def _shown_progress(run_name: str, phases: list[tuple[str, TrainingKnobs]]) -> Iterator[None]:
    """Show the progress of Ray Train run ``run_name`` on the console while the block runs: a bar
    per phase (``(label, knobs)``: one per model the run trains, in order), each shown from the
    moment rank 0 reports that phase's label (or the first one's, for a run of one)."""
    shown = console.current()
    if shown.quiet:
        yield
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    board = ProgressBoard.options(
        name=board_name(run_name),
        scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=True
        ),
    ).remote()
    stop = threading.Event()
    labels = [label for label, _ in phases]
    bars = ExitStack()
    current: dict[str, Any] = {"index": -1, "bar": None}

    def open_phase(index: int) -> None:
        """Close the bars before phase ``index`` and show its own."""
        while current["index"] < index:
            if current["bar"] is not None:
                bars.close()
            current["index"] += 1
            label, knobs = phases[current["index"]]
            images_per_step = knobs.batch_size * knobs.num_workers
            # Rates from the first step on: starting the workers is not training time.
            current["bar"] = bars.enter_context(
                shown.progress(
                    label, knobs.steps, "step", "img/s", images_per_step, rate_from_start=False
                )
            )

    lock = threading.Lock()

    def show_latest() -> None:
        try:
            states = ray.get(board.get.remote(), timeout=10)
        except Exception:  # the board is gone or slow: try again next time
            return
        # The latest report of each phase: a phase's bar closes at its own last report, not at
        # whichever step the driver saw before the next phase's reports replaced it.
        reported = {labels.index(p) if p in labels else 0: state for p, state in states.items()}
        with lock:
            for index in sorted(i for i in reported if i >= current["index"]):
                open_phase(index)
                state = reported[index]
                current["bar"].update(done=state["step"], **state["figures"])

    def follow() -> None:
        while not stop.wait(POLL_SECONDS):
            show_latest()

    with lock:
        open_phase(0)
    thread = threading.Thread(target=follow, name=f"progress-{labels[0]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        show_latest()
        bars.close()
        ray.kill(board)


class _ProgressReport:
    """Rank 0's side: the latest step and training loss to the driver's board, if it has one."""

    def __init__(self, rank: int, phase: str | None = None):
        self.board = None
        self.last = 0.0
        self.phase = phase
        if rank != 0:
            return
        try:
            self.board = ray.get_actor(board_name(ray.train.get_context().get_experiment_name()))
        except Exception:  # no console follows this run (library use, quiet)
            self.board = None

    def __call__(self, step: int, last_step: int, means: Mapping[str, float]) -> None:
        now = time.monotonic()
        if self.board is None or (now - self.last < REPORT_SECONDS and step != last_step):
            return
        self.last = now
        figures = {}
        name = "train/loss" if "train/loss" in means else next(iter(means), None)
        if name is not None:
            figures[name.removeprefix("train/").removeprefix("train_")] = means[name]
        try:
            self.board.put.remote({"phase": self.phase, "step": step, "figures": figures})
        except Exception:  # progress is best effort
            self.board = None


# -------------------------------------------------------------------------------------------------
# Driver side


def _worker_resources(knobs: TrainingKnobs) -> dict[str, float]:
    """What one training worker reserves."""
    return {"CPU": knobs.cpus_per_worker} | ({"GPU": 1.0} if knobs.use_gpu else {})


# Ray Train's switch for the actor that watches the workers' nodes for drains (preemptions); read
# by the controller, which inherits it from this process.
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


@contextmanager
def _preemption_watcher_off(local_ray: bool) -> Iterator[None]:
    """On a Ray started in this process, turn Ray Train's preemption watcher off for the run
    started in the block (the controller reads the switch from this process' environment when
    the run starts); a setting of the user's stays, and so does any other run's environment.

    Such a Ray is one node that no autoscaler drains: the watcher, an actor process of its own in
    every run, would have nothing to watch."""
    if not local_ray or PREEMPTION_WATCHER_ENV in os.environ:
        yield
        return
    os.environ[PREEMPTION_WATCHER_ENV] = "0"
    try:
        yield
    finally:
        os.environ.pop(PREEMPTION_WATCHER_ENV, None)


class LeanTorchTrainer(TorchTrainer):
    """A ``TorchTrainer`` that leaves out the helper actors a run has no use for.

    Ray Train starts, in every run and each in a process of its own, besides the controller and
    the workers:

    - a dataset manager, to hand out Ray Data shards: left out when the run is given no datasets
      (the training stages read their data themselves, ``EpochReader``);
    - a placement-group cleaner, detached, that removes the run's reserved resources should the
      controller die while the Ray it ran on lives on: left out when ``local_ray``, a Ray started
      in this process that ends with it;
    - a preemption watcher, that watches the workers' nodes for drains: left out when
      ``local_ray`` too (``_preemption_watcher_off``).

    On a small run each costs about as much CPU time as the run's controller (1 to 2.5
    CPU-seconds to start); on a cluster the cleaner and the watcher stay.
    """

    def __init__(self, *args: Any, local_ray: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        left_out: list[type] = [] if self.datasets else [DatasetsCallback]
        if local_ray:
            left_out.append(PlacementGroupCleanerCallback)
        self._left_out = tuple(left_out)
        self._local_ray = local_ray

    def _create_default_callbacks(self) -> list[Any]:
        callbacks = super()._create_default_callbacks()
        return [cb for cb in callbacks if not isinstance(cb, self._left_out)]

    def fit(self) -> Any:
        with _preemption_watcher_off(self._local_ray):
            return super().fit()


def controller_callbacks(
    resource_wait_seconds: float, section: str, knobs: TrainingKnobs
) -> list[ResourceWait]:
    """The callbacks of a run's controller: plain values only, so that the controller's process
    imports nothing heavy to unpickle them (pipelines.train_control)."""
    return [
        ResourceWait(resource_wait_seconds, section, knobs.num_workers, _worker_resources(knobs))
    ]


def run_trainer(
    train_loop_per_worker: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    *,
    name: str,
    stage_dir: str,
    knobs: TrainingKnobs,
    section: str,
    resource_wait_seconds: float,
    datasets: Mapping[str, Any] | None = None,
    label: str | None = None,
    phases: list[tuple[str, TrainingKnobs]] | None = None,
    local_ray: bool = False,
):
    """Run one Ray Train job and return its ``ray.train.Result`` (with a final checkpoint).

    The run lives at ``<stage_dir>/ray/<name>``: running again with the same name after an
    interruption makes Ray Train hand the latest checkpoint to the loop, which resumes from it.
    Its progress shows on the console under ``label`` (default: the stage folder's name); a run
    that trains several models in turn names them in ``phases`` instead (``(label, knobs)`` each,
    the label being what ``fit(progress_phase=)`` reports). ``knobs`` sets the workers, and
    ``section`` is where they sit in the config (``train_vqvae``, ``train_prior.top``).
    Workers that the cluster cannot place within ``resource_wait_seconds``, at the start or
    after a lost worker, fail the run with a ``CapacityError``. ``local_ray``: the Ray is one
    started in this process (``is_local_ray``).
    """
    ray_dir = storage.join(stage_dir, "ray")
    if not storage.is_url(ray_dir):
        ray_dir = os.path.abspath(ray_dir)  # Ray Train wants an absolute local path
    trainer = LeanTorchTrainer(
        run_packed_loop,
        train_loop_config=pack_loop(train_loop_per_worker, loop_config),
        scaling_config=ScalingConfig(
            num_workers=knobs.num_workers,
            use_gpu=knobs.use_gpu,
            resources_per_worker={"CPU": knobs.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=ray_dir,
            failure_config=FailureConfig(max_failures=knobs.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=controller_callbacks(resource_wait_seconds, section, knobs),
        ),
        datasets=dict(datasets or {}),
        local_ray=local_ray,
    )
    phases = phases or [(label or os.path.basename(stage_dir.rstrip("/")), knobs)]
    log.info(
        "%s: %s step(s) on %d worker(s), checkpoints under %s",
        *(name, " + ".join(str(k.steps) for _, k in phases), knobs.num_workers, ray_dir),
    )
    try:
        with _shown_progress(name, phases):
            result = trainer.fit()
    except ControllerError as err:
        if isinstance(err.controller_failure, CapacityError):
            raise err.controller_failure from None
        raise
    finally:
        interrupts.reclaim()  # Ray Train's SIGINT handler outlives the run
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name!r} finished without a checkpoint in {ray_dir}")
    return result


def is_local_ray(ray_section: RaySection) -> bool:
    """Whether the stages run on a Ray started in this process (not a cluster's)."""
    return not (ray_section.address or os.environ.get("RAY_ADDRESS"))


def training_threads(knobs: TrainingKnobs, local: bool) -> int:
    """Torch threads per training worker.

    Training reads no Ray Data while it runs, so with a local Ray the workers may use the whole
    machine: its CPUs divided among them. On a cluster, what each worker reserved.
    """
    if knobs.torch_threads is not None:
        return knobs.torch_threads
    if local:
        total = int(ray.cluster_resources().get("CPU", 0)) or os.cpu_count() or 1
        return max(1, total // knobs.num_workers)
    return max(1, int(knobs.cpus_per_worker))


def load_final_model(result, prefer_best: bool = False) -> tuple[nn.Module, CheckpointMeta]:
    """The model of a finished run's last checkpoint and its metadata (step, metrics, ...).

    With ``prefer_best``, the weights with the best held-out score instead, when the run selected
    on one (``fit(select_metric=...)``); their metadata names the step they come from.
    """
    with result.checkpoint.as_directory() as directory:
        return load_with_meta(_final_file(directory, prefer_best))


def publish_model(model: nn.Module, uri: str, meta: CheckpointMeta) -> bytes:
    """Write ``model`` in the vq_core checkpoint format to a path or URL, atomically; returns the bytes."""
    data = checkpoint_bytes(model, meta)
    storage.write_bytes(uri, data)
    return data


def take_columns(dataset, limit: int, columns: list[str]) -> dict[str, np.ndarray]:
    """``limit`` rows of a Ray dataset (with a "key" column) as one stacked array per column.

    The rows kept are those with the smallest key hashes (pipelines.data.keys.smallest_by_key_hash), so
    the subset does not depend on the order the corpus is listed in. Held-out data for evaluation
    is small, so it is read once on the driver and shipped to the workers: every evaluation then
    scores the same examples, which keeps the curve comparable.
    """
    from pipelines.data.keys import smallest_by_key_hash

    def rows():
        batches = dataset.select_columns(list(dict.fromkeys(["key", *columns]))).iter_batches(
            batch_size=1024, batch_format="numpy"
        )
        for batch in batches:
            for i, key in enumerate(batch["key"]):
                yield str(key), [np.array(batch[c][i]) for c in columns]

    kept = smallest_by_key_hash(rows(), limit)
    if not kept:
        return {c: np.empty((0,)) for c in columns}
    return {c: np.stack([row[n] for _, row in kept]) for n, c in enumerate(columns)}


# -------------------------------------------------------------------------------------------------
# Worker side


class _Best:
    """A copy of the model at its best held-out score so far (lower is better)."""

    def __init__(self, metric: str | None):
        self.metric = metric
        self.value = float("inf")
        self.step = 0
        self.metrics: dict[str, float] = {}
        self.model: nn.Module | None = None
        self.stale = 0  # evaluations in a row that did not beat the best (early stopping)

    def offer(self, model: nn.Module, metrics: Mapping[str, float], step: int) -> None:
        """Keep a copy of ``model`` if ``metrics`` (training means and evaluation) beat the best."""
        if self.metric is None or self.metric not in metrics:
            return
        if metrics[self.metric] < self.value:
            self.value, self.step, self.metrics = float(metrics[self.metric]), step, dict(metrics)
            self.model = copy.deepcopy(unwrap_model(model)).eval()
            self.stale = 0
        else:
            self.stale += 1

    def save(self, directory: str, meta: CheckpointMeta) -> None:
        if self.model is not None:
            meta = meta.model_copy(
                update={"step": self.step, "metrics": self.metrics, "selected": True}
            )
            save_with_meta(self.model, os.path.join(directory, BEST_FILE), meta)

    def restore(self, directory: str, device: torch.device) -> None:
        path = os.path.join(directory, BEST_FILE)
        if self.metric is not None and os.path.exists(path):
            self.model, meta = load_with_meta(path, map_location=device)
            self.metrics, self.step = dict(meta.metrics), meta.trained_step()
            self.value = float(self.metrics[self.metric])
            self.stale = meta.stale_evaluations


def _save(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    directory: str,
    meta: CheckpointMeta,
    best: _Best,
) -> None:
    save_with_meta(unwrap_model(model), os.path.join(directory, MODEL_FILE), meta)
    torch.save(optimizer.state_dict(), os.path.join(directory, OPTIMIZER_FILE))
    best.save(directory, meta)


def _restore(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    best: _Best,
    level: str | None,
) -> tuple[int, dict[str, int], bytes | None]:
    """Load the latest Ray Train checkpoint, if any and if it is of this ``level``'s model (a run
    that trains several levels in turn checkpoints each), into model and optimizer; returns its
    step, where in the data it was (epoch, batches of that epoch done) and its chosen weights
    (``_chosen_file``)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None or checkpoint.get_metadata().get(LEVEL_KEY) != level:
        return 0, {"epoch": 0, "epoch_batch": 0}, None
    bare = unwrap_model(model)
    with checkpoint.as_directory() as directory:
        # The expected config guards against resuming from a run of a different model.
        saved, meta = load_with_meta(
            os.path.join(directory, MODEL_FILE),
            map_location=device,
            expected_config=dataclasses.asdict(bare.config),
        )
        bare.load_state_dict(saved.state_dict())
        optimizer.load_state_dict(
            torch.load(
                os.path.join(directory, OPTIMIZER_FILE), map_location=device, weights_only=True
            )
        )
        best.restore(directory, device)
        chosen = _chosen_file(directory)
    return meta.trained_step(), {"epoch": meta.epoch, "epoch_batch": meta.epoch_batch}, chosen


def _final_file(directory: str, prefer_best: bool) -> str:
    """The weights file of a checkpoint folder: with ``prefer_best``, the best weights when the
    run selected on a score, else the last ones (a vq_core checkpoint)."""
    best = os.path.join(directory, BEST_FILE)
    return best if prefer_best and os.path.exists(best) else os.path.join(directory, MODEL_FILE)


def _chosen_file(directory: str) -> bytes:
    """What ``load_final_model(prefer_best=True)`` would load from this checkpoint folder."""
    with open(_final_file(directory, prefer_best=True), "rb") as f:
        return f.read()


class _Window:
    """Running means of the logged training scalars between two log points.

    Sums stay on the device so a step never waits for a host copy; .item() happens once per window.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, logs: Mapping[str, torch.Tensor]) -> None:
        for k, v in logs.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1

    def means(self) -> dict[str, float]:
        out = {k: (v / self.count).item() for k, v in self.sums.items()} if self.count else {}
        self.sums, self.count = {}, 0
        return out


def _finite(means: dict[str, float], step: int, lr: float) -> dict[str, float]:
    bad = {k: v for k, v in means.items() if not np.isfinite(v)}
    if bad:
        raise FloatingPointError(
            f"training diverged by step {step}: {bad}; try a lower lr (now {lr})"
        )
    return means


def _due(step: int, every: int, last: int) -> bool:
    return step % every == 0 or step == last


class _Loop:
    """One worker's training loop state: the model, its optimizer and what gets logged.

    ``fit`` drives it; each method is one step of an iteration, in order: ``train_step``, then
    ``log`` / ``evaluate`` / ``checkpoint`` when due.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        knobs: TrainingKnobs,
        *,
        evaluate_fn: EvaluateFn | None,
        tracking: TrackingContext | None,
        metric_prefix: str,
        channels_last: bool,
        checkpoint_meta: CheckpointMeta,
        select_metric: str | None,
        progress_phase: str | None = None,
    ):
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        on_gpu = self.device.type == "cuda"
        self.bf16 = knobs.precision == "bf16" and on_gpu
        if knobs.precision == "bf16" and not on_gpu and self.rank == 0:
            log.warning(
                "precision bf16 applies on GPU only; training in float32 on %s", self.device
            )
        # Pays off with bf16 tensor-core convolutions only.
        self.channels_last = channels_last and self.bf16
        # Rank 0 alone logs to MLflow.
        if tracking is None or self.rank != 0:
            tracking = TrackingContext(tracking_uri="", run_id=None)
        self.tracking, self.prefix = tracking, metric_prefix
        self.knobs, self.loss_fn, self.evaluate_fn = knobs, loss_fn, evaluate_fn
        self.meta = checkpoint_meta

        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if knobs.activation_checkpointing:
            set_activation_checkpointing(model, True)
        self.model = ray.train.torch.prepare_model(model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=knobs.lr)
        self.best = _Best(select_metric if self.rank == 0 else None)
        self.window = _Window()
        self.train_means: dict[str, float] = {}
        self.evaluation: dict[str, float] = {}
        self.window_started = time.perf_counter()
        self.report_progress = _ProgressReport(self.rank, progress_phase)
        # The chosen weights of the checkpoint the run ends at or resumed from (rank 0): what the
        # run gives for this model.
        self.chosen: bytes | None = None
        # Where in the data the next step's batch comes from; saved in checkpoints.
        self.position = {"epoch": 0, "epoch_batch": 0}

    def resume(self) -> int:
        """Restore the latest checkpoint, if any; returns the step to continue from."""
        step, self.position, self.chosen = _restore(
            self.model, self.optimizer, self.device, self.best, self.meta.level
        )
        if step:
            log.info("rank %d resumes at step %d of %d", self.rank, step, self.knobs.steps)
            self.tracking.log_metrics({f"{self.prefix}resumed_at_step": step}, step=step)
        return step

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], step: int) -> None:
        """One optimizer step over ``knobs.accumulate_steps`` micro-batches."""
        self.model.train()
        if self.channels_last:
            micro_batches = [
                {
                    k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v
                    for k, v in batch.items()
                }
                for batch in micro_batches
            ]
        self.optimizer.zero_grad(set_to_none=True)
        autocast = partial(torch.autocast, self.device.type, torch.bfloat16, enabled=self.bf16)
        for logs in accumulate_gradients(self.model, self.loss_fn, micro_batches, step, autocast):
            self.window.add(logs)
        self.optimizer.step()

    def log(self, step: int) -> None:
        seconds = (time.perf_counter() - self.window_started) / max(self.window.count, 1)
        # Checked here rather than every step: a host sync per step would stall a GPU.
        self.train_means = _finite(self.window.means(), step, self.knobs.lr)
        self.tracking.log_metrics(
            {f"{self.prefix}{k}": v for k, v in self.train_means.items()}
            | {f"{self.prefix}seconds_per_step": seconds},
            step=step,
        )
        self.window_started = time.perf_counter()

    def evaluate(self, step: int) -> None:
        started = time.perf_counter()
        self.evaluation = _evaluate(self.model, self.evaluate_fn, self.device, self.bf16)
        # On the fixed held-out subset (holdout_batches x batch_size). Its cost goes to MLflow
        # alone (not to checkpoints and manifests, which a re-run must reproduce), so that a
        # user sees whether it dominates the stage and can lower holdout_batches if it does.
        seconds = time.perf_counter() - started
        self.best.offer(self.model, {**self.train_means, **self.evaluation}, step)
        self.tracking.log_metrics(
            {f"{self.prefix}{k}": v for k, v in self.evaluation.items()}
            | {f"{self.prefix}evaluation_seconds": seconds},
            step=step,
        )

    def checkpoint(self, step: int, last: bool) -> None:
        """Report a checkpoint of ``step``; at the ``last`` step, keep its chosen weights, which
        ``fit`` returns (rank 0 reads them back from the folder only then)."""
        metrics = {"step": step, **self.train_means, **self.evaluation}
        # trained_steps survives in the selected weights' metadata, whose step is the one selected.
        meta = self.meta.model_copy(
            update={**self.position, "trained_steps": step, "stale_evaluations": self.best.stale}
        )
        chosen = _report(self.model, self.optimizer, self.rank, metrics, meta, self.best, last)
        if last:
            self.chosen = chosen

    def should_stop(self) -> bool:
        """After an evaluation step: whether ``early_stopping`` evaluations in a row missed the
        best score. Rank 0 decides (it alone evaluates) and every rank gets its answer."""
        stop = self.best.metric is not None and self.best.stale >= self.knobs.early_stopping
        if self.world_size > 1:
            flag = torch.tensor([1.0 if stop else 0.0], device=self.device)
            torch.distributed.broadcast(flag, src=0)
            stop = bool(flag.item())
        return stop

    def after_step(self, step: int, start_step: int) -> bool:
        """Log, evaluate and checkpoint when due; evaluation and checkpoints are not step time.
        Returns True when early stopping ends training at this step (after a checkpoint)."""
        knobs = self.knobs
        # Logged first: an evaluation keeps the training means of its own step with the weights
        # it selects (not the previous window's, nor none at the first evaluation).
        logged = _due(step, knobs.log_every, knobs.steps)
        if logged:
            self.log(step)
        paused = time.perf_counter()
        evaluated = self.evaluate_fn is not None and _due(step, knobs.eval_every, knobs.steps)
        if evaluated and self.rank == 0:
            self.evaluate(step)
        stop = evaluated and knobs.early_stopping > 0 and self.should_stop()
        if stop and not logged:
            self.window_started += time.perf_counter() - paused
            paused = time.perf_counter()
            self.log(step)
        if stop and self.rank == 0:
            log.info(
                "early stopping at step %d of %d: %s has not improved for %d evaluations "
                "(best %.4g at step %d)",
                step,
                knobs.steps,
                self.best.metric,
                self.best.stale,
                self.best.value,
                self.best.step,
            )
            self.tracking.log_metrics({f"{self.prefix}early_stopped_at_step": step}, step=step)
        if _due(step, knobs.checkpoint_every, knobs.steps) or stop:
            self.checkpoint(step, last=stop or step == knobs.steps)
        self.window_started += time.perf_counter() - paused
        # The step early stopping ends at is this model's last: reported whatever the time since
        # the last report, so that its bar ends there.
        self.report_progress(step, step if stop else knobs.steps, self.train_means)
        if knobs.fail_at_step == step and start_step < step:
            raise InjectedFailure(f"fault injected after step {step} (fail_at_step)")
        return stop


def accumulate_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    micro_batches: list[dict[str, torch.Tensor]],
    step: int,
    autocast: Callable[[], Any] = nullcontext,
) -> Iterator[Mapping[str, torch.Tensor]]:
    """Add the gradients of the mean loss over ``micro_batches`` to ``model``'s (each micro-batch's
    loss weighs 1/n: for equal sizes, the gradient of one batch of them all); yields each
    micro-batch's logs. Under DistributedDataParallel the ranks' gradients are averaged once, on
    the last micro-batch."""
    count = len(micro_batches)
    for index, batch in enumerate(micro_batches):
        last = index == count - 1
        sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast():
                loss, logs = loss_fn(model, batch, step)
            (loss / count).backward()
        yield logs


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    knobs: TrainingKnobs,
    *,
    data: EpochReader,
    evaluate_fn: EvaluateFn | None = None,
    tracking: TrackingContext | None = None,
    metric_prefix: str = "",
    dtypes: dict[str, torch.dtype] | None = None,
    channels_last: bool = False,
    checkpoint_meta: CheckpointMeta | None = None,
    seed: int = 0,
    select_metric: str | None = None,
    threads: int | None = None,
    progress_phase: str | None = None,
) -> bytes | None:
    """Train ``model`` for ``knobs.steps`` optimizer steps on this worker's batches of ``data``,
    or fewer when ``knobs.early_stopping`` evaluations in a row miss the best ``select_metric``.

    Call from a Ray Train ``train_loop_per_worker``. Every rank runs the same number of steps and
    reports at the same steps (``ray.train.report`` is a barrier); rank 0 alone evaluates, logs to
    MLflow and writes checkpoints. Metrics are logged as ``<metric_prefix><name>`` at the global step.
    With ``select_metric`` (a key of evaluate_fn's result, lower is better), checkpoints also keep
    the weights that scored best on it, for ``load_final_model(prefer_best=True)``. ``threads``
    sets torch's intra-op threads (see ``training_threads``); ``progress_phase``, the label the
    console's bar of this model has (``run_trainer(phases=)``).

    A run may call it for several models in turn, each with its own ``checkpoint_meta.level``:
    each resumes from the run's latest checkpoint only if that checkpoint is of its level.
    Returns, on rank 0, what the final checkpoint holds for ``load_final_model(prefer_best=True)``
    (the vq_core checkpoint bytes of the selected or last weights); None on the other ranks.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    loop = _Loop(
        model,
        loss_fn,
        knobs,
        evaluate_fn=evaluate_fn,
        tracking=tracking,
        metric_prefix=metric_prefix,
        channels_last=channels_last,
        checkpoint_meta=checkpoint_meta or CheckpointMeta(),
        select_metric=select_metric,
        progress_phase=progress_phase,
    )
    start_step = loop.resume()
    # Different noise per rank and per attempt (dropout, Gumbel), reproducible for a given run.
    torch.manual_seed(seed + 1000 * loop.rank + start_step)

    if start_step and knobs.early_stopping and loop.should_stop():
        return loop.chosen  # the checkpoint resumed from is where an earlier attempt stopped early
    _train_epochs(loop, data, dtypes, start_step)
    # Metrics queued while the tracking server was unreachable leave with this process.
    loop.tracking.flush(raise_on_failure=False)
    return loop.chosen


def _train_epochs(
    loop: _Loop, data: EpochReader, dtypes: dict[str, torch.dtype] | None, start_step: int
) -> None:
    """Train from ``start_step``, at the data position ``loop`` resumed at, epoch after epoch
    until ``knobs.steps`` or early stopping."""
    knobs = loop.knobs
    step = start_step
    epoch, done = loop.position["epoch"], loop.position["epoch_batch"]
    stopped = False
    # Micro-batches waiting for an optimizer step (knobs.accumulate_steps of them make one); a
    # step's micro-batches may span the end of an epoch.
    pending: list[dict[str, torch.Tensor]] = []
    while step < knobs.steps and not stopped:
        batches = 0
        stream = data.batches(epoch, loop.rank, loop.world_size, knobs.batch_size)
        for index, batch in enumerate(stream):
            if index < done:
                continue  # trained on before the checkpoint this run resumed from
            batches += 1
            pending.append(_to_torch(batch, dtypes, loop.device))
            if len(pending) < knobs.accumulate_steps:
                continue
            loop.position = {"epoch": epoch, "epoch_batch": index + 1}
            loop.train_step(pending, step)
            pending = []
            step += 1
            stopped = loop.after_step(step, start_step)
            if step >= knobs.steps or stopped:
                break
        if batches == 0 and done == 0:
            raise ValueError(
                f"the {data.split} split gave rank {loop.rank} no batches in epoch {epoch}; it is "
                f"empty or holds fewer rows than there are workers ({loop.world_size})"
            )
        epoch, done = epoch + 1, 0


def _to_torch(
    batch: dict[str, np.ndarray], dtypes: dict[str, torch.dtype] | None, device: torch.device
) -> dict[str, torch.Tensor]:
    out = {}
    for name, values in batch.items():
        dtype = (dtypes or {}).get(name)
        if dtype == torch.int64 and values.dtype != np.int64:
            values = values.astype(np.int64)  # stored uint8/uint16 codes; torch indexes with int64
        tensor = torch.from_numpy(np.ascontiguousarray(values))
        out[name] = (tensor if dtype is None else tensor.to(dtype)).to(device)
    return out


def _evaluate(
    model: nn.Module, evaluate_fn: EvaluateFn, device: torch.device, bf16: bool
) -> dict[str, float]:
    # The bare model: a DDP forward on one rank alone would wait forever for the others.
    bare = unwrap_model(model)
    bare.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return {k: float(v) for k, v in evaluate_fn(bare, device).items()}
    finally:
        bare.train()


def _report(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rank: int,
    metrics: dict[str, float],
    meta: CheckpointMeta,
    best: _Best,
    read_chosen: bool,
) -> bytes | None:
    """Report ``metrics`` with a checkpoint (written by rank 0); returns, on rank 0 and with
    ``read_chosen``, the checkpoint's chosen weights (``_chosen_file``), else None."""
    step = int(metrics["step"])
    if rank != 0:
        # Every rank must call report (it is a barrier); the weights are the same on all ranks.
        ray.train.report(metrics, checkpoint=None)
        return None
    with tempfile.TemporaryDirectory() as directory:
        meta = meta.model_copy(update={"step": step, "metrics": metrics})
        _save(model, optimizer, directory, meta, best)
        checkpoint = ray.train.Checkpoint.from_directory(directory)
        checkpoint.set_metadata({LEVEL_KEY: meta.level})
        chosen = _chosen_file(directory) if read_chosen else None
        ray.train.report(
            metrics,
            checkpoint=checkpoint,
            checkpoint_dir_name=f"{meta.level}-step-{step:08d}"
            if meta.level
            else f"step-{step:08d}",
        )
    return chosen
