"""`vqpipe reconstruct`: an image folder in, the model's view of every image out, same layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.cli import main as cli_main
from pipelines.data.images import decode_image, to_model_input, to_uint8
from pipelines.tools.reconstruct import reconstruct_folder
from vq_core.checkpoint import save_checkpoint
from vq_core.vqvae import VQVAE2, VQVAE2Config


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = VQVAE2(
        VQVAE2Config(
            channels=16,
            res_blocks=1,
            res_channels=8,
            embed_dim=8,
            codebook_size_top=16,
            codebook_size_bottom=16,
        )
    )
    path = tmp_path / "model.pt"
    save_checkpoint(model.eval(), str(path), extra={"image_size": [16, 24]})
    return str(path), model.eval()


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    (root / "b" / "deep").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a/one.png", "a/two.jpg", "b/deep/three.png"):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(root / name)
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "notes.txt").write_text("not an image")
    return root


def test_writes_the_same_layout_and_skips_bad_files(checkpoint, folder, tmp_path):
    path, model = checkpoint
    out = tmp_path / "out"
    summary = reconstruct_folder(path, str(folder), str(out), batch_size=2)
    assert summary["written"] == 3 and summary["skipped_bad_inputs"] == 1
    assert summary["image_size"] == [16, 24]
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["a/one.png", "a/two.png", "b/deep/three.png"]

    # Each output is decode(encode(x)) of the image as the model sees it.
    original = decode_image((folder / "a" / "one.png").read_bytes(), (16, 24), 3)
    with torch.inference_mode():
        expected = to_uint8(
            model.decode_codes(model.encode(to_model_input(original[None]))).clamp(-1, 1)
        )[0]
    got = np.asarray(Image.open(out / "a" / "one.png"))
    assert got.shape == (16, 24, 3)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_side_by_side_and_explicit_size(checkpoint, folder, tmp_path):
    path, _ = checkpoint
    out = tmp_path / "pairs"
    reconstruct_folder(path, str(folder), str(out), image_size=(8, 8), side_by_side=True)
    assert np.asarray(Image.open(out / "a" / "one.png")).shape == (8, 16, 3)


def _cli_reconstruct(checkpoint: str, input_dir: str, output_dir: str) -> int:
    return cli_main(
        ["reconstruct", "--checkpoint", checkpoint, "--input", input_dir, "--output", output_dir]
    )


def test_cli_reconstruct_and_its_errors(checkpoint, folder, tmp_path, capsys):
    path, _ = checkpoint
    assert _cli_reconstruct(path, str(folder), str(tmp_path / "o")) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 3
    assert _cli_reconstruct(path, str(tmp_path / "nope"), "x") == 2
    assert "is not a folder" in capsys.readouterr().err
    assert _cli_reconstruct(str(tmp_path / "missing.pt"), str(folder), "x") == 2
    assert "missing.pt' does not exist" in capsys.readouterr().err
