"""Shared fixtures for the pipeline tests: one real local Ray per session, tiny configs."""

from __future__ import annotations

import os

import pytest

from pipelines.config import PipelineConfig, parse_config


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray (2 CPUs, no dashboard), shared by every pipeline test of the session."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=256 * 1024**2,
            log_to_driver=False,
        )
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


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
