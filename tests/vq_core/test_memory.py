"""The training-memory estimate: its parts count what they say, and the whole is close to a peak
measured independently (the resident memory of a separate process running the same steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vq_core.memory import LiveStorages, estimate_training_memory, saved_tensor_bytes
from vq_core.pixelsnail import PixelSNAIL, PixelSNAILConfig

PRIOR = dict(num_codes=256, height=16, width=16, channels=64, num_blocks=2, res_blocks=2)
CLASSES = 4


def test_live_storages_counts_allocations_and_frees():
    with LiveStorages() as live:
        a = torch.empty(1000, dtype=torch.float32)  # 4,000 bytes
        b = torch.empty(500, dtype=torch.float64)  # 4,000 bytes
        view = a[10:20]  # a view allocates nothing
        assert live.current == 8000
        del b
        assert live.current == 4000
        c = torch.empty(250, dtype=torch.int16)  # 500 bytes
        del a  # the view keeps its storage alive
        assert live.current == 4500
        del view, c
    assert live.current == 0
    assert live.peak == 8000


def test_saved_tensor_bytes_counts_each_saved_storage_once():
    x = torch.randn(100, 10, requires_grad=True)  # 4,000 bytes
    w = torch.randn(10, 10, requires_grad=True)  # 400 bytes

    def forward():
        y = x @ w  # saves x and w
        return (y * x).sum()  # saves y (4,000) and x again (counted once)

    assert saved_tensor_bytes(forward) == 4000 + 400 + 4000


def _prior_batch(n: int):
    generator = torch.Generator().manual_seed(n)
    codes = torch.randint(
        0, PRIOR["num_codes"], (n, PRIOR["height"], PRIOR["width"]), generator=generator
    )
    return codes, torch.randint(0, CLASSES, (n,), generator=generator)


def _measured_peak(batch: int, tmp_path) -> int:
    """Peak resident bytes of two training steps in a fresh process, above its resident size
    before them, plus the weights (resident before the steps, part of the estimate)."""
    script = tmp_path / "steps.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, resource, torch
            from vq_core.pixelsnail import PixelSNAIL, PixelSNAILConfig
            torch.set_num_threads(1)
            torch.manual_seed(0)
            model = PixelSNAIL(PixelSNAILConfig(**{PRIOR!r}, num_classes={CLASSES})).train()
            optimizer = torch.optim.Adam(model.parameters())
            data = [(torch.randint(0, {PRIOR["num_codes"]}, ({batch}, {PRIOR["height"]},
                     {PRIOR["width"]})), torch.randint(0, {CLASSES}, ({batch},)))
                    for _ in range(2)]
            with open("/proc/self/statm") as f:
                before = int(f.read().split()[1]) * resource.getpagesize()
            # The peak from here on: reset the high-water mark (getrusage's maxrss would not do,
            # it carries the parent's size across fork and exec).
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            for codes, labels in data:
                model.loss(codes, labels).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            with open("/proc/self/status") as f:
                hwm = [line for line in f if line.startswith("VmHWM:")][0]
            peak = int(hwm.split()[1]) * 1024
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            print(json.dumps({{"growth": peak - before, "weights": weights}}))
            """
        )
    )
    # Large blocks straight from mmap, so that freed tensors leave the resident set at once
    # instead of staying in the heap and inflating the peak.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, check=True
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    return figures["growth"] + figures["weights"]


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="reads Linux /proc")
def test_estimate_is_within_a_quarter_of_the_measured_peak(tmp_path):
    batch = 16
    torch.manual_seed(0)
    model = PixelSNAIL(PixelSNAILConfig(**PRIOR, num_classes=CLASSES))
    estimate = estimate_training_memory(
        model, _prior_batch, lambda m, b: m.loss(*b), batch_size=batch
    )
    measured = _measured_peak(batch, tmp_path)
    assert measured > 100 * 2**20  # large enough that allocator noise does not decide the test
    assert abs(estimate.peak_bytes - measured) <= 0.25 * measured, (
        estimate.describe(),
        measured,
    )
    # Activations dominate at this batch, and most of them are what autograd saves.
    assert estimate.per_sample_bytes * batch > 5 * estimate.fixed_bytes
    assert 0.5 * estimate.per_sample_bytes < estimate.saved_per_sample_bytes


def test_estimate_leaves_the_model_untouched():
    torch.manual_seed(0)
    model = PixelSNAIL(PixelSNAILConfig(**PRIOR, num_classes=CLASSES))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    estimate_training_memory(model, _prior_batch, lambda m, b: m.loss(*b), batch_size=4)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_estimate_scales_with_the_batch():
    torch.manual_seed(0)
    model = PixelSNAIL(PixelSNAILConfig(**PRIOR, num_classes=CLASSES))
    estimate = estimate_training_memory(model, _prior_batch, lambda m, b: m.loss(*b), batch_size=8)
    assert estimate.at_batch(16).peak_bytes - estimate.peak_bytes == 8 * estimate.per_sample_bytes
    parameters = sum(p.numel() for p in model.parameters())
    assert estimate.parameter_bytes == 4 * parameters
    # Weights, gradients and Adam's two moments: at least 16 bytes per float32 parameter.
    assert estimate.fixed_bytes >= 16 * parameters
