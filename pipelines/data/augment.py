"""Augmentation of the autoencoder's training images: a random crop from a slightly larger resize,
and a horizontal flip.

Applied by the training reader to the train split only (``EpochReader.batches``), after the
shuffle buffer, on uint8 H x W x C batches. Each batch's draws come from a generator seeded by
(seed, epoch, rank, batch index), so the same config and seed give the same batches, and a resumed
run that skips the batches it already trained on augments the rest exactly as the first run would
have.
"""

from __future__ import annotations

import numpy as np

from pipelines.config import AugmentSection


def augment_batch(
    images: np.ndarray, settings: AugmentSection, rng: np.random.Generator
) -> np.ndarray:
    """uint8 N x H x W x C -> the same shape, each image cropped and perhaps flipped."""
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(
            f"augment_batch takes uint8 N x H x W x C images, got {images.dtype} {images.shape}"
        )
    n, height, width, _ = images.shape
    out = images
    if settings.crop_scale > 1.0:
        bigger = _resized(
            images, round(height * settings.crop_scale), round(width * settings.crop_scale)
        )
        top = rng.integers(0, bigger.shape[1] - height + 1, size=n)
        left = rng.integers(0, bigger.shape[2] - width + 1, size=n)
        out = np.stack(
            [bigger[i, t : t + height, s : s + width] for i, (t, s) in enumerate(zip(top, left))]
        )
    if settings.flip:
        mirrored = rng.random(n) < 0.5
        out = out.copy() if out is images else out
        out[mirrored] = out[mirrored, :, ::-1]
    return out


def _resized(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a uint8 batch (torch: one call for the whole batch)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    y = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
