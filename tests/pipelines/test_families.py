"""Every one-level model family through every stage, from its shipped config, at tiny size.

The two-level VQ-VAE-2 (``configs/demo.yaml``) runs in test_end_to_end. Here each of the other
demo configs is read from ``configs/``, shrunk (16x16 images, tiny models, a few steps) and run
through train_vqvae -> tokenize -> train_prior -> sample -> evaluate on one shared generated
corpus. The two VQ-VAE configs differ only in their prior, and so do the two dVAE ones
(``demo-dvae``, ``demo-dalle``): the second of each pair reuses the first one's autoencoder and
codes, as the runner skips those stages for a user.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines.config import parse_config
from pipelines.data.images import decode_image
from pipelines.data.shards import iter_code_samples
from pipelines.manifest import read_manifest
from pipelines.runner import run_stages
from pipelines.stages import STAGES, stage_names
from tests.pipelines.conftest import tiny_raw_config
from vq_core.checkpoint import load_checkpoint
from vq_core.kinds import get_kind

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["circle", "square", "triangle", "cross"]
PER_CLASS = 6
K = 16  # codebook size of every tiny autoencoder

DVAE_MODEL = {
    "channels": 16,
    "res_blocks": 1,
    "res_channels": 8,
    "embed_dim": 8,
    "codebook_size": K,
    "downsample": 4,
}

# config file -> (autoencoder kind, prior kind, tiny model sections)
FAMILIES = {
    "demo-vqvae-pixelcnn": (
        "vqvae",
        "pixelcnn",
        {"channels": 16, "res_blocks": 1, "res_channels": 8, "embed_dim": 8, "codebook_size": K},
        {"channels": 16, "num_layers": 2},
    ),
    "demo-vqvae-pixelsnail": (
        "vqvae",
        "pixelsnail",
        {"channels": 16, "res_blocks": 1, "res_channels": 8, "embed_dim": 8, "codebook_size": K},
        {"channels": 16, "num_blocks": 1, "res_blocks": 1, "num_heads": 2, "dropout": 0.0},
    ),
    "demo-dvae": (
        "dvae",
        "pixelsnail",
        DVAE_MODEL,
        {"channels": 16, "num_blocks": 1, "res_blocks": 1, "num_heads": 2, "dropout": 0.0},
    ),
    "demo-dalle": (
        "dvae",
        "transformer",
        DVAE_MODEL,
        {"channels": 16, "num_layers": 1, "num_heads": 2, "dropout": 0.0},
    ),
}


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


def tiny_family_config(name: str, root: Path):
    """The shipped config ``configs/<name>.yaml`` with tiny sizes, under ``root``."""
    kind, prior_kind, vq_model, prior_model = FAMILIES[name]
    shipped = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    assert shipped["train_vqvae"]["kind"] == kind
    assert shipped["train_prior"]["codes"]["kind"] == prior_kind
    tiny = tiny_raw_config(str(root / kind), str(root / "corpus"))
    raw = {**shipped, **{k: tiny[k] for k in ("output_dir", "sample", "evaluate", "tokenize")}}
    raw["data"] = {
        **tiny["data"],
        "generate": {"images_per_class": PER_CLASS, "classes": CLASSES, "image_size": 16},
    }
    raw["train_vqvae"] = {**tiny["train_vqvae"], "kind": kind, "model": vq_model}
    raw["train_prior"] = {
        "codes": {**tiny["train_prior"]["top"], "kind": prior_kind, "model": prior_model}
    }
    return parse_config(raw)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_runs_every_stage(name, ray_local, shared_root):
    kind, prior_kind, _, _ = FAMILIES[name]
    cfg = tiny_family_config(name, shared_root)
    levels = list(get_kind(kind).levels)
    assert levels == ["codes"]
    results = run_stages(cfg, run_name=name)

    # Every stage left its manifest; only the prior differs between the two VQ-VAE configs.
    assert list(results) == list(stage_names())
    for spec in STAGES:
        assert read_manifest(cfg.output_dir, spec.manifest) == results[spec.name].manifest
    if name in ("demo-vqvae-pixelsnail", "demo-dalle") and results["train_vqvae"].skipped:
        assert results["tokenize"].skipped
    assert not results["train_prior"].skipped

    vq = results["train_vqvae"].manifest
    assert vq.levels == levels and vq.model == kind

    # Codes: one map per image, of the declared shape, inside the codebook.
    tok = results["tokenize"].manifest
    assert tok.levels == levels and tok.codebook_sizes == {"codes": K}
    samples = list(iter_code_samples([shard.uri for shard in tok.shards]))
    assert len(samples) == tok.samples == PER_CLASS * len(CLASSES)
    for s in samples:
        assert set(s) >= {"key", "label", "codes"} and "top" not in s
        codes = np.asarray(s["codes"])
        assert codes.shape == tuple(tok.code_shapes["codes"]) == (4, 4)
        assert 0 <= codes.min() and codes.max() < K

    # One class-conditional prior over the one level, of the configured kind.
    priors = results["train_prior"].manifest
    assert priors.levels == levels and list(priors.priors) == levels
    entry = priors.priors["codes"]
    assert entry.kind == prior_kind and entry.condition is None
    model, extra = load_checkpoint(entry.checkpoint)
    assert type(model).__name__ == get_kind(prior_kind).class_name
    assert (model.config.num_codes, model.config.num_classes) == (K, len(CLASSES))
    assert extra["level"] == "codes" and math.isfinite(entry.validation_bits_per_code)

    # Samples decoded to images of the corpus' shape, per class.
    sample = results["sample"].manifest
    assert sample.levels == levels and sorted(sample.classes) == sorted(CLASSES)
    for class_name, info in sample.classes.items():
        pngs = sorted(f for f in os.listdir(info.dir) if f.endswith(".png"))
        assert len(pngs) == cfg.sample.per_class == info.count, class_name
        image = decode_image(open(os.path.join(info.dir, pngs[0]), "rb").read(), (16, 16), 3)
        assert image.shape == (16, 16, 3) and image.dtype == np.uint8

    # The report covers the one level, and its metrics are finite.
    evaluated = results["evaluate"].manifest
    assert evaluated.levels == levels
    for metric in (
        "test/mse",
        "test/perplexity/codes",
        "test/bits_per_code/codes",
        "cas/generated_to_real",
    ):
        assert math.isfinite(evaluated.metrics[metric]), metric
    assert not any("top" in k or "bottom" in k for k in evaluated.metrics)
    report = open(evaluated.report).read()
    assert f"| codes | {prior_kind} | - | {K} |" in report
    assert f"| codes | {K} |" in report  # the codebook table's row
    assert "| top |" not in report and "| bottom |" not in report
