"""vqpipe decode: code shards back to images, equal to reconstructions, with clear bad-input errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from jobs.cli import main as cli_main
from pipelines.errors import InputError
from pipelines.stages.tokenize import run as run_tokenize
from pipelines.tools.decode import decode_shards
from pipelines.tools.reconstruct import reconstruct_folder
from tests.pipelines.stages.test_tokenize import tokenize_setup  # noqa: F401  (a fixture)
from vq_core.checkpoint import save_checkpoint
from vq_core.vqvae import VQVAE, VQVAEConfig


def _pngs(root: str) -> dict[str, bytes]:
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".png"):
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    found[os.path.relpath(path, root)] = f.read()
    return found


@pytest.fixture
def tokenized(tokenize_setup):  # noqa: F811
    ctx, model, images, _ = tokenize_setup
    manifest = run_tokenize(ctx)
    checkpoint = os.path.join(ctx.cfg.output_dir, "train_vqvae", "model.pt")
    save_checkpoint(model, checkpoint, extra={"image_size": [16, 16]})  # as the stage saves it
    return ctx, checkpoint, manifest, images


def test_tokenize_then_decode_reproduces_reconstruct_exactly(tokenized, tmp_path):
    ctx, checkpoint, manifest, images = tokenized
    summary = decode_shards(checkpoint, ctx.stage_dir, str(tmp_path / "decoded"), batch_size=5)
    assert summary["written"] == manifest.samples == len(images)
    reconstruct_folder(checkpoint, ctx.cfg.data.source, str(tmp_path / "reconstructed"))
    decoded = _pngs(str(tmp_path / "decoded"))
    reconstructed = _pngs(str(tmp_path / "reconstructed"))
    # Same layout as the corpus, and the same bytes: decode(encode(x)) either way.
    assert set(decoded) == {f"{key}.png" for key in images}
    assert set(decoded) <= set(reconstructed)  # reconstruct also tries the broken files
    for name, data in decoded.items():
        assert data == reconstructed[name], name


def test_decode_reads_plain_webdataset_shards_without_labels(tokenized, tmp_path):
    import webdataset as wds

    ctx, checkpoint, manifest, images = tokenized
    # Another team's shards: the code fields only, no .cls, through webdataset's own writer.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    samples = list(wds.WebDataset([s.uri for s in manifest.shards], shardshuffle=False))
    with wds.TarWriter(str(foreign / "part-000.tar")) as sink:
        for sample in samples[:6]:
            sink.write({k: sample[k] for k in ("__key__", "top.npy", "bottom.npy")})
    assert (
        cli_main(
            [
                "decode",
                "--checkpoint",
                checkpoint,
                "--input",
                str(foreign),
                "--output",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    assert len(_pngs(str(tmp_path / "out"))) == 6


def test_bad_checkpoint_and_mismatched_shards_write_nothing(tokenized, tmp_path, capsys):
    ctx, checkpoint, _, _ = tokenized
    from vq_core.pixelsnail import PixelSNAIL, PixelSNAILConfig

    prior = tmp_path / "prior.pt"
    save_checkpoint(PixelSNAIL(PixelSNAILConfig(num_codes=4, height=2, width=2, channels=8)), prior)
    out = tmp_path / "never"
    with pytest.raises(InputError, match="holds a PixelSNAIL, not an autoencoder"):
        decode_shards(str(prior), ctx.stage_dir, str(out))
    # A one-level autoencoder cannot decode two-level shards: both lists of levels are named.
    one_level = tmp_path / "one.pt"
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(channels=16, res_blocks=1, res_channels=8, embed_dim=8))
    save_checkpoint(model, one_level, extra={"image_size": [16, 16]})
    with pytest.raises(
        InputError,
        match=r"holds the code levels \['bottom', 'top'\], but the autoencoder has the levels "
        r"\['codes'\]",
    ):
        decode_shards(str(one_level), ctx.stage_dir, str(out))
    # Codes of the wrong map size for the image size.
    assert (
        cli_main(
            [
                "decode",
                "--checkpoint",
                checkpoint,
                "--input",
                ctx.stage_dir,
                "--output",
                str(out),
                "--image-size",
                "32",
            ]
        )
        == 2
    )
    assert "top codes are uint8 (2, 2)" in capsys.readouterr().err
    assert not out.exists()


def test_codes_outside_the_codebook_are_refused(tokenized):
    from pipelines.tools.decode import check_codes

    _, checkpoint, _, _ = tokenized
    from vq_core.checkpoint import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    codes = {"top": np.full((1, 2, 2), 16, np.uint8), "bottom": np.zeros((1, 4, 4), np.uint16)}
    with pytest.raises(InputError, match=r"range over \[16, 16\], outside the codebook of 16"):
        check_codes(codes, model, (16, 16), "sample x")
