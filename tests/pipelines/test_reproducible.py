"""The same config and seed give the same codes and metrics, whatever else runs on the machine."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import numpy as np

from pipelines.config import parse_config
from pipelines.data.shards import iter_code_samples
from pipelines.runner import run_stages
from tests.pipelines.conftest import SHARED_CLASSES, SHARED_PER_CLASS

# Figures that measure the machine rather than the models.
TIMINGS = ("seconds", "images_per_second", "evaluate/seconds")


def _pipeline(raw: dict, name: str) -> dict:
    return {s: o.manifest for s, o in run_stages(parse_config(raw), run_name=name).items()}


def _codes(tokenized) -> dict[str, tuple]:
    return {
        s["key"]: (s["label"], s["top"].tobytes(), s["bottom"].tobytes())
        for s in iter_code_samples(shard.uri for shard in tokenized.shards)
    }


def _figures(manifests: dict) -> dict[str, float]:
    figures = {}
    figures |= {f"train_vqvae/{k}": v for k, v in manifests["train_vqvae"].metrics.items()}
    for level, entry in manifests["train_prior"].priors.items():
        figures[f"train_prior/{level}/validation"] = entry.validation_bits_per_code
        figures[f"train_prior/{level}/train"] = entry.train_bits_per_code
        figures[f"train_prior/{level}/selected_step"] = entry.selected_step
    figures |= {
        f"evaluate/{k}": v
        for k, v in manifests["evaluate"].metrics.items()
        if not k.endswith(TIMINGS)
    }
    return figures


@contextlib.contextmanager
def competing_processes(count: int):
    """CPU-bound processes, ``count`` of them, for as long as the block runs.

    At the niceness Ray gives its workers (15): a fair competitor, not one that starves them.
    """
    busy = "import os; os.nice(max(0, 15 - os.nice(0)))\nwhile True: pass"
    spinners = [subprocess.Popen([sys.executable, "-c", busy]) for _ in range(count)]
    try:
        yield
    finally:
        for process in spinners:
            process.kill()
            process.wait()


def test_a_run_under_load_gives_the_same_codes_and_metrics(shared_run, tmp_path):
    """The shared run (its autoencoder on two DDP ranks: the per-rank reader and gradient
    averaging too), then the same config in another folder while other work competes for the
    cores: under pytest-xdist the other workers' tests, which keep the cores busy (each runs Ray
    jobs of its own); run alone, a CPU-bound process."""
    first = shared_run.manifests
    others = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) - 1
    with competing_processes(0 if others else 1):
        second = _pipeline(shared_run.raw_config(str(tmp_path / "second")), "second")

    codes = _codes(first["tokenize"])
    assert len(codes) == SHARED_PER_CLASS * len(SHARED_CLASSES)
    assert _codes(second["tokenize"]) == codes  # every key: label and both code maps
    assert first["tokenize"].splits == second["tokenize"].splits
    one, two = _figures(first), _figures(second)
    assert "evaluate/test/bits_per_code/top" in one and "evaluate/cas/generated_to_real" in one
    assert one.keys() == two.keys()
    for name, value in one.items():
        assert (np.isnan(value) and np.isnan(two[name])) or two[name] == value, name
