"""Will a training stage fit its workers' memory? Estimated before the run, from a probe.

Each training stage declares its ``MemoryProbe``s: the model its workers build, a batch as they
read it and its loss. Before the Ray Train run starts, ``preflight`` runs a few probe steps of a
copy of the model (``vq_core.memory``: two small batches, extrapolated to the configured one) where
the workers will run: on a GPU worker's device when the stage trains on GPUs, so that the estimate
and the device's memory come from the same place, in this process otherwise. The estimate is
logged to the console and to MLflow; when it exceeds the device's memory the stage fails at once
with an error naming the keys that lower it, instead of an out-of-memory error minutes later.
``vqpipe validate`` prints the same estimates, probed on this machine's CPU.

The estimate covers the weights, gradients, Adam's moments, DDP's gradient buckets and what one
step keeps and allocates per sample at the stage's precision and activation checkpointing; not the
CUDA context (about half a gigabyte), the data reader's buffers, or fragmentation, hence the
headroom below.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipelines import console
from pipelines.config import TrainingKnobs
from pipelines.errors import MemoryBudgetError
from pipelines.tracking import TrackingContext
from vq_core.memory import GIB, MemoryEstimate, estimate_training_memory
from vq_core.recompute import set_activation_checkpointing

log = logging.getLogger("vqpipe")

# Share of a GPU's memory an estimate may take: the rest is for the CUDA context, the allocator's
# fragmentation and what the estimate leaves out.
HEADROOM = 0.9


@dataclass(frozen=True)
class MemoryProbe:
    """A training stage's model and batches as its workers see them (picklable: ``build`` and
    ``make_batch`` are module-level functions or partials of them)."""

    section: str  # where the knobs sit in the config: train_vqvae, train_prior.top, ...
    knobs: TrainingKnobs
    build: Callable[[], nn.Module]
    make_batch: Callable[[int], dict[str, torch.Tensor]]
    # (model, batch, step) -> (loss, logs), the stage's own training loss
    loss_fn: Callable[[nn.Module, dict[str, torch.Tensor], int], tuple[torch.Tensor, Any]]


def estimate(probe: MemoryProbe, device: torch.device | str = "cpu") -> MemoryEstimate:
    """The probe's estimate on ``device``, at the knobs' batch, precision and checkpointing."""
    device = torch.device(device)
    model = probe.build()
    if probe.knobs.activation_checkpointing:
        set_activation_checkpointing(model, True)
    knobs = probe.knobs

    def make_batch(n: int) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in probe.make_batch(n).items()}

    return estimate_training_memory(
        model,
        make_batch,
        lambda m, batch: probe.loss_fn(m, batch, 0)[0],
        batch_size=knobs.batch_size,
        precision=knobs.precision,
        device=device,
        data_parallel=knobs.num_workers > 1,
    )


def _estimate_on_gpu(probe: MemoryProbe) -> tuple[MemoryEstimate, int, str]:
    """On a GPU worker: the estimate, the device's memory and its name."""
    device = torch.device("cuda")
    properties = torch.cuda.get_device_properties(device)
    return estimate(probe, device), int(properties.total_memory), properties.name


def remedies(section: str, knobs: TrainingKnobs) -> str:
    """The keys that lower a stage's memory per worker, as a user would set them."""
    keys = [
        f"{section}.batch_size (now {knobs.batch_size}; raise {section}.accumulate_steps, now "
        f"{knobs.accumulate_steps}, to keep the effective batch)"
    ]
    if not knobs.activation_checkpointing:
        keys.append(f"{section}.activation_checkpointing: true")
    if knobs.precision != "bf16":
        keys.append(f"{section}.precision: bf16")
    keys.append(f"a smaller {section}.model")
    return "; ".join(keys)


def preflight(probe: MemoryProbe, tracking: TrackingContext | None = None) -> MemoryEstimate:
    """Estimate the stage's peak memory per worker where it will train; log it, and raise a
    ``MemoryBudgetError`` when it does not fit a GPU worker's device."""
    import ray

    knobs = probe.knobs
    if knobs.use_gpu:
        remote = ray.remote(num_gpus=1, num_cpus=0)(_estimate_on_gpu)
        found, capacity, device = ray.get(remote.remote(probe))
    else:
        found, capacity, device = estimate(probe), None, "cpu"
    text = f"{probe.section}: estimated peak memory per worker {found.describe()} on {device}"
    log.info("%s", text)
    console.current().line(text)
    if tracking is not None:
        tracking.log_metrics(
            {
                f"memory/{probe.section}/estimated_peak_gib": found.peak_bytes / GIB,
                f"memory/{probe.section}/per_sample_gib": found.per_sample_bytes / GIB,
            }
        )
    if capacity is not None:
        check_budget(probe.section, knobs, found, capacity, device)
    return found


def check_budget(
    section: str, knobs: TrainingKnobs, found: MemoryEstimate, capacity: int, device: str
) -> None:
    """Raise a ``MemoryBudgetError`` when ``found`` exceeds ``HEADROOM`` of ``capacity`` bytes."""
    if found.peak_bytes <= HEADROOM * capacity:
        return
    raise MemoryBudgetError(
        f"{section} needs about {found.peak_bytes / GIB:.1f} GiB per worker at batch_size "
        f"{knobs.batch_size} (precision {knobs.precision}, activation checkpointing "
        f"{'on' if knobs.activation_checkpointing else 'off'}), more than {HEADROOM:.0%} of the "
        f"{capacity / GIB:.1f} GiB of its GPU ({device}); lower it with "
        f"{remedies(section, knobs)}"
    )
