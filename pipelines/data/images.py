"""Conversions between encoded image files, uint8 pixel arrays and model tensors.

Three representations meet in the pipeline:

- encoded bytes (PNG, JPEG, ... as found in a corpus or written as an artifact);
- uint8 arrays B x H x W x C, what the corpus readers produce and what grids are made of;
- float32 tensors B x C x H x W in [-1, 1], what every vq_core model consumes and produces.

Decoding normalises whatever a corpus holds to the configured size and channel count, so every
later stage can assume one shape. The rules for unusual files are part of the contract:

- Transparency (RGBA, LA, palette images with a transparent colour) is flattened onto a white
  background, the way a viewer shows such a file; dropping alpha instead would expose whatever
  colour the encoder left under transparent pixels (often black).
- Palette, CMYK, YCbCr, bilevel and other modes are converted with PIL's own colour conversion.
- 16-bit grey (``I;16``, ``I``) is scaled from 0..65535 to 0..255; PIL's plain conversion would
  clip every value above 255 to white.
- An EXIF orientation tag is applied, so a photo is seen the right way up.
- Multi-frame files (GIF, APNG, TIFF) contribute their first frame.
- Grey output ("L") uses PIL's ITU-R 601 luma from RGB.
- Resizing scales the short side to fit, then centre-crops the long side, so the aspect ratio is
  never distorted.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

# Files larger than this many pixels are refused as corrupt or hostile (decompression bombs)
# rather than allowed to exhaust a worker's memory; 16k x 16k is far beyond any training image.
MAX_PIXELS = 16384 * 16384


class BadImageError(ValueError):
    """An input file that cannot be decoded into an image; the message says why."""


def _flatten_alpha(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_mode(image: Image.Image, channels: int) -> Image.Image:
    """``image`` as "L" (channels=1) or "RGB" (channels=3), following the module's rules."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(grey, mode="L")
    elif mode == "F":
        image = Image.fromarray(np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8))
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in image.info
    ):
        image = _flatten_alpha(image)
    target = "L" if channels == 1 else "RGB"
    return image if image.mode == target else image.convert(target)


def _fit(image: Image.Image, size_hw: tuple[int, int]) -> Image.Image:
    """Scale so the image covers ``size_hw``, then centre-crop the excess."""
    height, width = size_hw
    if image.size == (width, height):
        return image
    scale = max(height / image.height, width / image.width)
    new_w = max(width, round(image.width * scale))
    new_h = max(height, round(image.height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return image.crop((left, top, left + width, top + height))


def decode_image(data: bytes, size_hw: tuple[int, int], channels: int) -> np.ndarray:
    """Decode an image file to uint8 H x W x C at ``size_hw`` with ``channels`` (1 or 3).

    Raises BadImageError naming the reason when ``data`` is empty, truncated or not an image.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if not data:
        raise BadImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL warns before it raises for oversized images; make that an error as well.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise BadImageError(
                        f"image of {image.width}x{image.height} pixels exceeds the limit of "
                        f"{MAX_PIXELS} pixels"
                    )
                image.load()  # decode now: a truncated file fails here, not later
                image = ImageOps.exif_transpose(image)
                image = _fit(_to_mode(image, channels), size_hw)
                array = np.asarray(image, dtype=np.uint8)
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError("not a recognised image (unknown format or damaged header)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as err:
        # PIL reports truncation, bad chunks and oversized images through these types.
        raise BadImageError(f"cannot decode image ({type(err).__name__}: {err})") from None
    if array.ndim == 2:
        array = array[:, :, None]
    return array


def to_model_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 B x H x W x C (numpy or torch) -> float32 B x C x H x W in [-1, 1]."""
    # torch is imported here, not at the top: corpus readers and shard writers use this module
    # for decoding only, and sparing their worker processes a torch import saves memory and time.
    import torch

    if not torch.is_tensor(images):
        images = np.asarray(images)
        if not images.flags.writeable:  # Ray hands out read-only views; torch warns about those
            images = images.copy()
    tensor = torch.as_tensor(images)
    if tensor.ndim != 4 or tensor.dtype != torch.uint8:
        raise ValueError(
            f"expected uint8 images B x H x W x C, got {tensor.dtype} of shape {tuple(tensor.shape)}"
        )
    return tensor.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float B x C x H x W in [-1, 1] -> uint8 B x H x W x C (values outside are clipped)."""
    import torch

    if images.ndim != 4:
        raise ValueError(f"expected images B x C x H x W, got shape {tuple(images.shape)}")
    pixels = images.detach().float().add(1.0).mul(127.5).round().clamp(0, 255)
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile uint8 B x H x W x C into one H' x W' x C image, ``nrow`` images per row.

    ``nrow`` defaults to ceil(sqrt(B)), the squarest grid; gaps are white.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(
            f"expected uint8 images B x H x W x C, got {images.dtype} of shape {images.shape}"
        )
    count, height, width, channels = images.shape
    if count == 0:
        raise ValueError("make_grid needs at least one image")
    nrow = nrow or math.ceil(math.sqrt(count))
    if nrow <= 0:
        raise ValueError(f"nrow must be positive, got {nrow}")
    rows = math.ceil(count / nrow)
    grid = np.full(
        (rows * (height + padding) + padding, nrow * (width + padding) + padding, channels),
        255,
        dtype=np.uint8,
    )
    for i, image in enumerate(images):
        r, c = divmod(i, nrow)
        top, left = padding + r * (height + padding), padding + c * (width + padding)
        grid[top : top + height, left : left + width] = image
    return grid


def encode_png(image: np.ndarray) -> bytes:
    """uint8 H x W x C (C = 1, 3 or 4) or H x W -> PNG bytes."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(
            f"expected a uint8 image H x W x C or H x W, got {image.dtype} of shape {image.shape}"
        )
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
