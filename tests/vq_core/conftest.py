"""Small fixtures for the vq_core tests: one intra-op thread, a generated dataset of shapes."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """The models in these tests are tiny: intra-op threads only add synchronisation, which costs
    a lot on a busy 2-core machine (one learning test went from 3 s to minutes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_shapes(
    count: int, size: int = 32, channels: int = 3, seed: int = 0, width: int | None = None
) -> torch.Tensor:
    """count x channels x size x width images in [-1, 1]: a flat background with a coloured
    rectangle and a coloured disc at random places. Structured enough that an autoencoder can
    learn it in a few hundred steps, varied enough that it must use many codes to do so."""
    width = size if width is None else width
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(size).view(1, size, 1).float()
    xs = torch.arange(width).view(1, 1, width).float()

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g)

    images = rand(count, channels, 1, 1).mul(0.6).sub(1.0).expand(count, channels, size, width)
    images = images.clone()

    # Rectangle: corners drawn uniformly, at least a quarter of the image on each side.
    top = (rand(count) * size * 0.6).view(count, 1, 1)
    left = (rand(count) * width * 0.6).view(count, 1, 1)
    height = (size * (0.25 + 0.3 * rand(count))).view(count, 1, 1)
    breadth = (width * (0.25 + 0.3 * rand(count))).view(count, 1, 1)
    inside = (ys >= top) & (ys < top + height) & (xs >= left) & (xs < left + breadth)
    colour = (rand(count, channels) * 1.6 - 0.6).view(count, channels, 1, 1)
    images = torch.where(inside.unsqueeze(1), colour.expand_as(images), images)

    # Disc, drawn over the rectangle.
    cy = (rand(count) * size).view(count, 1, 1)
    cx = (rand(count) * width).view(count, 1, 1)
    radius = (min(size, width) * (0.1 + 0.15 * rand(count))).view(count, 1, 1)
    inside = (ys - cy) ** 2 + (xs - cx) ** 2 <= radius**2
    colour = (rand(count, channels) * 1.6 - 0.6).view(count, channels, 1, 1)
    images = torch.where(inside.unsqueeze(1), colour.expand_as(images), images)
    return images.clamp(-1.0, 1.0).contiguous()


@pytest.fixture(scope="session")
def shapes_rgb() -> torch.Tensor:
    """256 RGB 32x32 images of coloured shapes."""
    return make_shapes(256, size=32, channels=3, seed=0)


@pytest.fixture(scope="session")
def shapes_grey() -> torch.Tensor:
    """16 single-channel 32x48 images (non-square)."""
    return make_shapes(16, size=32, width=48, channels=1, seed=1)
