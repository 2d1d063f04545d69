"""Helpers of the pipeline tests: tiny configs, the shared run's config and helpers (its fixtures,
with the session's local Ray, are in tests/conftest.py)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from pipelines.config import PipelineConfig, parse_config


def _tiny_prior(**model) -> dict:
    """A prior section: 4 steps, evaluated and checkpointed every 2, a one-block PixelSNAIL."""
    return {
        "steps": 4,
        "batch_size": 8,
        "log_every": 2,
        "eval_every": 2,
        "checkpoint_every": 2,
        "holdout_batches": 1,
        "model": {"channels": 16, "num_blocks": 1, "res_blocks": 1, "dropout": 0.0, **model},
    }


def tiny_raw_config(output_dir: str, source: str) -> dict:
    """The smallest configuration that exercises every stage: 16x16 RGB, tiny models, a few steps."""
    return {
        "output_dir": output_dir,
        "seed": 0,
        "data": {
            "source": source,
            "image_size": 16,
            "channels": 3,
            "validation_fraction": 0.2,
            "test_fraction": 0.2,
        },
        "train_vqvae": {
            "kind": "vqvae2",
            "model": {
                "channels": 16,
                "res_blocks": 1,
                "res_channels": 8,
                "embed_dim": 8,
                "codebook_size_top": 16,
                "codebook_size_bottom": 16,
            },
            "steps": 6,
            "batch_size": 8,
            "log_every": 2,
            "eval_every": 3,
            "checkpoint_every": 3,
            "holdout_batches": 1,
            "grid_images": 4,
        },
        "tokenize": {"batch_size": 8, "shard_max_samples": 10, "cpus_per_actor": 0.5},
        "train_prior": {
            "top": _tiny_prior(num_heads=2),
            "bottom": _tiny_prior(attention=False),
        },
        "sample": {"per_class": 2, "batch_size": 4},
        "evaluate": {"holdout_batches": 1, "batch_size": 8, "classifier_steps": 5},
    }


@pytest.fixture
def tiny_config(tmp_path):
    """Factory: tiny_config(source, **overrides_by_dotted_key) -> PipelineConfig under tmp_path/out."""

    def make(source: str, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
        return parse_config(tiny_raw_config(str(tmp_path / "out"), source), overrides)

    return make


# The shared run: one pipeline run of the session that the tests which only read a finished run's
# outputs share (tests/pipelines/test_end_to_end.py, test_integrity.py, test_reproducible.py,
# evaluation/test_published_figures.py, stages/test_stage_settings.py, and what
# tests/jobs/test_console.py reads of its console). Four classes of six images and two corrupt
# files; rejection sampling on, so that every section a stage can read is read; the models
# registered; the autoencoder on two DDP ranks; bf16 asked of the priors (on CPU each warns once);
# label dropout in the top prior's training.
# It runs as a user runs it: `vqpipe run` in its own process, with its own local Ray.
SHARED_CLASSES = ["circle", "cross", "square", "triangle"]
SHARED_PER_CLASS = 6
SHARED_CORRUPT = 2


def shared_raw_config(output_dir: str, source: str) -> dict:
    raw = tiny_raw_config(output_dir, source)
    raw["data"]["generate"] = {
        "images_per_class": SHARED_PER_CLASS,
        "classes": SHARED_CLASSES,
        "image_size": 16,
        "corrupt_files": SHARED_CORRUPT,
    }
    raw["train_vqvae"] |= {"num_workers": 2, "cpus_per_worker": 0.5}
    for level in ("top", "bottom"):
        raw["train_prior"][level]["precision"] = "bf16"
    # The top prior learns a "no class" label too (label dropout), so that its draws can be
    # guided; the bottom one does not, so that guiding it is refused.
    raw["train_prior"]["top"]["model"]["label_dropout"] = 0.1
    raw["sample"]["rejection"] = {"enabled": True, "keep_fraction": 0.5, "classifier_steps": 3}
    raw["mlflow"] = {"registered_models": {"autoencoder": "e2e-tokenizer", "prior": "e2e-prior"}}
    # The local Ray of `vqpipe run`; a run in this process uses the session's (ray_local).
    raw["ray"] = {"num_cpus": 2, "object_store_memory": 256 * 1024**2}
    return raw


def vqpipe(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m jobs.cli ARGS`` in its own process, stdout and stderr to pipes (not a terminal),
    Ray's repeated worker lines folded as a user's console has them."""
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "RAY_DEDUP_LOGS": "1"},
    )


@dataclass
class SharedRun:
    """The shared run: its config, the outcome of each stage, the folder it lives in, and what
    `vqpipe run` printed (``console``: its exit status, stdout and stderr)."""

    cfg: PipelineConfig
    outcomes: dict
    root: str
    console: subprocess.CompletedProcess

    @property
    def manifests(self) -> dict:
        return {stage: outcome.manifest for stage, outcome in self.outcomes.items()}

    def raw_config(self, output_dir: str) -> dict:
        """The shared run's config with another output_dir (the same corpus)."""
        return shared_raw_config(output_dir, self.cfg.data.source)


@contextlib.contextmanager
def competing_processes(count: int) -> Iterator[None]:
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


def digests(folder: str) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    found = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


@contextlib.contextmanager
def restored(run: SharedRun, stages: list[str]) -> Iterator[None]:
    """Put the folders of ``stages`` back as they were when the block started."""
    saved = os.path.join(run.root, "saved")
    shutil.rmtree(saved, ignore_errors=True)
    for stage in stages:
        shutil.copytree(os.path.join(run.cfg.output_dir, stage), os.path.join(saved, stage))
    try:
        yield
    finally:
        for stage in stages:
            folder = os.path.join(run.cfg.output_dir, stage)
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(os.path.join(saved, stage), folder)
        shutil.rmtree(saved, ignore_errors=True)
