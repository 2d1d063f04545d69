"""``vqpipe reconstruct``: push an image folder through a trained autoencoder to inspect it.

Writes one PNG per input image at the same relative path under the output folder (the image as the
model sees it after encode -> codes -> decode), so a user can judge a tokenizer on their own images.
A single process: this is an inspection tool for folders a person will look at, not a corpus job
(the tokenize stage is that).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from pipelines.checkpoint_meta import CheckpointMeta
from pipelines.data import storage
from pipelines.data.images import BadImageError, decode_image, encode_png, to_model_input, to_uint8
from pipelines.errors import InputError, MissingInputError
from pipelines.tokenizer import autoencoder_from_bytes

log = logging.getLogger("vqpipe")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def load_autoencoder(checkpoint: str) -> tuple[torch.nn.Module, CheckpointMeta]:
    """The autoencoder (and its checkpoint's metadata) at a path, URL or ``models:/`` URI; a clear
    error when it is missing, not a vq_core checkpoint, or a model that is not an autoencoder."""
    from pipelines.mlflow_models import resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    if not storage.exists(path):
        raise MissingInputError(f"--checkpoint {checkpoint!r} does not exist")
    return autoencoder_from_bytes(storage.read_bytes(path), f"--checkpoint {checkpoint!r}")


def reconstruct_folder(
    checkpoint: str,
    input_dir: str,
    output_dir: str,
    image_size: tuple[int, ...] | None = None,
    batch_size: int = 32,
    side_by_side: bool = False,
) -> dict:
    """Reconstruct every image under ``input_dir`` into ``output_dir``; returns counts."""
    if not storage.is_dir(input_dir):
        raise MissingInputError(f"--input {input_dir!r} is not a folder")
    model, meta = load_autoencoder(checkpoint)
    size_hw = _image_size(checkpoint, meta, image_size)
    channels = model.config.in_channels
    files = _image_files(input_dir)
    written, bad, sq_err = 0, [], 0.0
    for start in range(0, len(files), batch_size):
        chunk, arrays = _read_images(files[start : start + batch_size], size_hw, channels, bad)
        if not arrays:
            continue
        x = to_model_input(np.stack(arrays))
        with torch.inference_mode():
            recon = model.decode_codes(model.encode(x)).clamp(-1, 1)
        sq_err += float(((recon - x) ** 2).mean(dim=(1, 2, 3)).sum())
        for f, original, image in zip(chunk, arrays, to_uint8(recon)):
            target = storage.join(output_dir, os.path.splitext(_relative(f, input_dir))[0] + ".png")
            pixels = np.concatenate([original, image], axis=1) if side_by_side else image
            storage.write_bytes(target, encode_png(pixels))
            written += 1
    summary = {
        "written": written,
        "skipped_bad_inputs": len(bad),
        "mse": sq_err / max(written, 1),
        "image_size": list(size_hw),
        "output": output_dir,
    }
    log.info("reconstructed %d images into %s (MSE %.5f)", written, output_dir, summary["mse"])
    return summary


def _image_size(
    checkpoint: str, meta: CheckpointMeta, image_size: tuple[int, ...] | None
) -> tuple[int, int]:
    """(H, W) from --image-size H [W], else the size the checkpoint records."""
    if image_size is not None:
        return (image_size[0], image_size[-1])
    size = meta.image_size
    if size is None:
        raise InputError(f"{checkpoint!r} does not record its image size; pass --image-size H [W]")
    return tuple(size)


def _image_files(input_dir: str) -> list[str]:
    files = [f for f in storage.list_files(input_dir) if f.lower().endswith(IMAGE_SUFFIXES)]
    if not files:
        raise MissingInputError(
            f"--input {input_dir!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})"
        )
    return files


def _read_images(
    files: list[str], size_hw: tuple[int, int], channels: int, bad: list[str]
) -> tuple[list[str], list[np.ndarray]]:
    """(files, images) of those that decode; the others are logged and added to ``bad``."""
    read, arrays = [], []
    for f in files:
        try:
            arrays.append(decode_image(storage.read_bytes(f), size_hw, channels))
            read.append(f)
        except BadImageError as err:
            log.warning("skipping %s: %s", f, err)
            bad.append(f)
    return read, arrays


def _relative(path: str, input_dir: str) -> str:
    """``path`` relative to ``input_dir``, a local folder or a URL."""
    if storage.is_url(input_dir):
        return path[len(input_dir) :].lstrip("/")
    return os.path.relpath(path, input_dir)
