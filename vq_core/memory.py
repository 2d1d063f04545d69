"""What a training step needs in memory, measured by running it rather than by a formula.

A model's peak memory in training is its weights, their gradients and the optimizer's state (batch
independent), plus what autograd saves for the backward pass and the workspace of the largest
operations (both proportional to the batch). Counting these by hand goes wrong as soon as a layer
saves more than one expects (a gate saves both its inputs; autocast keeps a float32 and a bfloat16
copy of a residual stream), so this module runs real training steps of a copy of the model at two
small batch sizes, measures each step's peak, and extrapolates linearly to the configured batch.

- On a GPU the peak is ``torch.cuda.max_memory_allocated`` (the caching allocator's own count).
- On the CPU there is no allocator statistic, so ``LiveStorages`` records every storage that the
  step's operations create and drops it when PyTorch frees it: the peak of live bytes.

``saved_tensor_bytes`` counts what autograd keeps between forward and backward (unique storages,
through ``torch.autograd.graph.saved_tensors_hooks``): the device-independent part of the estimate,
and the number to watch when choosing precision and activation checkpointing.
"""

from __future__ import annotations

import copy
import dataclasses
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GIB = 2**30

# A batch for the probe: make_batch(n) returns what loss_fn takes for n samples.
MakeBatch = Callable[[int], Any]
LossFn = Callable[[nn.Module, Any], torch.Tensor]


class LiveStorages(TorchDispatchMode):
    """Bytes of the tensor storages created while active and not yet freed, and their peak.

    A storage's Python object lives exactly as long as the storage (PyTorch keeps the two
    together), so a weakref finaliser on it runs when PyTorch frees the memory, wherever the last
    reference was (an autograd node, an optimizer state, a view)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key, nbytes = id(storage), storage.nbytes()
                if nbytes and key not in self._seen:
                    self._seen.add(key)
                    self.current += nbytes
                    weakref.finalize(storage, self._freed, key, nbytes)
        self.peak = max(self.peak, self.current)
        return out


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def saved_tensor_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the unique storages autograd saves for backward while ``fn()`` runs."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def autocast_for(device: torch.device, precision: str):
    """The autocast context of a training precision (``fp32`` or ``bf16``)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one training worker: the larger of the forward and backward pass,
    ``fixed_bytes + per_sample_bytes * batch_size``, and the optimizer update."""

    batch_size: int
    parameter_bytes: int  # the weights alone
    fixed_bytes: int  # batch independent: weights, gradients, optimizer state, DDP buckets
    per_sample_bytes: int  # activations and workspace per sample
    saved_per_sample_bytes: int  # of which autograd keeps between forward and backward
    device: str  # where the probe ran
    update_bytes: int = 0  # peak of the optimizer update, batch independent

    @property
    def peak_bytes(self) -> int:
        return max(self.fixed_bytes + self.per_sample_bytes * self.batch_size, self.update_bytes)

    def at_batch(self, batch_size: int) -> MemoryEstimate:
        return dataclasses.replace(self, batch_size=batch_size)

    def describe(self) -> str:
        return (
            f"{format_bytes(self.peak_bytes)} at batch {self.batch_size} "
            f"({format_bytes(self.fixed_bytes)} weights, gradients and optimizer state + "
            f"{format_bytes(self.per_sample_bytes)} per sample, of which "
            f"{format_bytes(self.saved_per_sample_bytes)} saved for backward)"
        )


def format_bytes(count: int) -> str:
    """``1.23 GiB`` from a gibibyte up, ``45.6 MiB`` below."""
    if abs(count) >= GIB:
        return f"{count / GIB:.2f} GiB"
    return f"{count / 2**20:.1f} MiB"


@dataclass(frozen=True)
class _StepPeaks:
    """Bytes of one steady-state training step: what stays resident between steps (weights,
    optimizer state), and the most the forward and backward pass, and the optimizer update, each
    allocate on top of it."""

    resident: int
    pass_peak: int
    update_peak: int
    forward_end: int  # live at the end of the forward pass, above resident: what backward needs
    gradients: int


class _Meter:
    """Peak bytes allocated since ``start()``, above what was live then (CUDA or CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.tracker = LiveStorages() if device.type != "cuda" else None

    def live(self) -> int:
        if self.tracker is None:
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        return self.tracker.current

    def start(self) -> int:
        base = self.live()
        if self.tracker is None:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.tracker.peak = base
        return base

    def peak_since(self, base: int) -> int:
        if self.tracker is None:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - base
        return self.tracker.peak - base


def _step_peaks(
    model: nn.Module,
    make_batch: MakeBatch,
    loss_fn: LossFn,
    batch: int,
    precision: str,
    device: torch.device,
) -> _StepPeaks:
    """Two optimizer steps of a fresh copy of ``model``; the second one measured, once Adam's
    state exists."""
    probe = copy.deepcopy(model).to(device).train()
    optimizer = torch.optim.Adam([p for p in probe.parameters() if p.requires_grad])
    weights = tensor_bytes(probe.parameters()) + tensor_bytes(probe.buffers())
    data = [make_batch(batch) for _ in range(2)]
    meter = _Meter(device)
    context = meter.tracker if meter.tracker is not None else nullcontext()
    with context:
        peaks = (0, 0, 0, 0)
        for inputs in data:
            base = meter.start()
            with autocast_for(device, precision):
                loss = loss_fn(probe, inputs)
            forward_end = meter.live() - base
            loss.backward()
            pass_peak = meter.peak_since(base)
            del loss
            update_base = meter.start()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update_peak = meter.peak_since(update_base) + (update_base - base)
            peaks = (base, pass_peak, update_peak, forward_end)
    base, pass_peak, update_peak, forward_end = peaks
    # On the CPU the tracker counts only what the steps allocated; the weights were there before.
    resident = base + (weights if meter.tracker is not None else 0)
    gradients = tensor_bytes(p for p in probe.parameters() if p.requires_grad)
    return _StepPeaks(resident, pass_peak, update_peak, forward_end, gradients)


def _saved_by_forward(
    model: nn.Module,
    make_batch: MakeBatch,
    loss_fn: LossFn,
    batch: int,
    precision: str,
    device: torch.device,
) -> int:
    """Bytes autograd saves in one forward pass of a copy of ``model`` on ``batch`` samples."""
    probe = copy.deepcopy(model).to(device).train()
    inputs = make_batch(batch)

    def forward() -> None:
        with autocast_for(device, precision):
            loss_fn(probe, inputs)

    return saved_tensor_bytes(forward)


def estimate_training_memory(
    model: nn.Module,
    make_batch: MakeBatch,
    loss_fn: LossFn,
    *,
    batch_size: int,
    precision: str = "fp32",
    device: torch.device | str = "cpu",
    data_parallel: bool = False,
    probe_batches: tuple[int, int] = (1, 2),
) -> MemoryEstimate:
    """Estimate one worker's peak memory for training ``model`` at ``batch_size``.

    ``loss_fn(model, make_batch(n))`` is one forward pass and its loss, as the training loop runs
    it (under the same autocast). The model is copied, so its state (EMA codebooks, running
    statistics) is untouched. ``data_parallel`` adds DistributedDataParallel's gradient buckets
    (one more copy of the gradients)."""
    device = torch.device(device)
    small, large = probe_batches
    if not 0 < small < large:
        raise ValueError(f"probe_batches must be two increasing sizes, got {probe_batches}")
    first, second = (
        _step_peaks(model, make_batch, loss_fn, n, precision, device) for n in probe_batches
    )
    # The forward and backward pass grows with the batch (activations, workspace); the update
    # does not. At probe batches the pass may peak late in backward, once the gradients exist and
    # most activations are gone, while at the configured batch it peaks where backward starts: so
    # per sample is the larger of the two slopes (the pass's peak, what the forward pass leaves
    # for backward), on top of the gradients (which fill up while activations are still there).
    span = large - small
    per_sample = max(
        0,
        (second.pass_peak - first.pass_peak) // span,
        (second.forward_end - first.forward_end) // span,
    )
    pass_fixed = first.pass_peak - per_sample * small
    fixed = first.resident + max(pass_fixed, first.gradients)
    update_bound = first.resident + max(first.update_peak, second.update_peak)

    saved = [
        _saved_by_forward(model, make_batch, loss_fn, n, precision, device) for n in (small, large)
    ]
    saved_per_sample = max(0, (saved[1] - saved[0]) // (large - small))

    parameters = tensor_bytes(model.parameters())
    if data_parallel:
        fixed += tensor_bytes(p for p in model.parameters() if p.requires_grad)
    return MemoryEstimate(
        batch_size=batch_size,
        parameter_bytes=parameters,
        fixed_bytes=fixed,
        per_sample_bytes=per_sample,
        saved_per_sample_bytes=saved_per_sample,
        device=str(device),
        update_bytes=update_bound,
    )
