"""Every stage at the paper's resolution, 256x256, through the real runner: tiny models, a few
images and steps, so that a shape, dtype or memory mistake that only shows at high resolution
fails here rather than on a cluster."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from pipelines.config import parse_config
from pipelines.data.image_cache import cache_directory
from pipelines.runner import run_stages
from pipelines.stages import stage_names
from tests.pipelines.conftest import tiny_raw_config

SIZE = 256
CLASSES = ["circle", "square"]


@pytest.fixture(scope="module")
def run_256(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("hires")
    raw = tiny_raw_config(str(root / "out"), str(root / "corpus"))
    raw["data"] |= {"image_size": SIZE, "validation_fraction": 0.25, "test_fraction": 0.25}
    raw["data"]["generate"] = {"images_per_class": 6, "classes": CLASSES, "image_size": SIZE}
    raw["train_vqvae"]["model"] |= {"channels": 8, "res_channels": 4}
    raw["train_vqvae"] |= {"steps": 2, "batch_size": 2, "eval_every": 2, "checkpoint_every": 2}
    for level in ("top", "bottom"):
        raw["train_prior"][level]["model"]["channels"] = 8
        raw["train_prior"][level] |= {
            "steps": 2,
            "batch_size": 2,
            "eval_every": 2,
            "checkpoint_every": 2,
        }
    raw["sample"] = {"per_class": 1, "batch_size": 2}
    raw["evaluate"] |= {"batch_size": 2, "classifier_steps": 2}
    cfg = parse_config(raw)
    return cfg, run_stages(cfg, run_name="hires")


def test_every_stage_runs_at_256(run_256):
    cfg, results = run_256
    assert list(results) == list(stage_names())
    vq = results["train_vqvae"].manifest
    assert vq.image_size == [SIZE, SIZE]
    assert vq.code_shapes == {"top": [32, 32], "bottom": [64, 64]}
    tok = results["tokenize"].manifest
    assert tok.samples == 12 and tok.code_shapes == vq.code_shapes


def test_samples_are_256_pixel_images(run_256):
    _, results = run_256
    sample = results["sample"].manifest
    assert sample.samples == len(CLASSES)
    for entry in sample.classes.values():
        files = sorted(os.listdir(entry.dir))
        assert files
        image = np.asarray(Image.open(os.path.join(entry.dir, files[0])))
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8


def test_the_training_cache_holds_the_files_not_their_pixels(run_256):
    cfg, _ = run_256
    directory = cache_directory(cfg.data, cfg.output_dir)
    parquet = [f for f in os.listdir(directory) if f.endswith(".parquet")]
    cached = sum(os.path.getsize(os.path.join(directory, f)) for f in parquet)
    corpus = sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, files in os.walk(cfg.data.source)
        for f in files
        if f.endswith(".png")
    )
    assert cached <= 1.2 * corpus + 16384
    assert cached < 12 * SIZE * SIZE * 3 / 2  # well under half the decoded pixels
