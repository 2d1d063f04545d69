"""The image cache's two encodings give the same training pixels; the encoded one stays the size
of the corpus; augmentation changes the train split's images only, reproducibly."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from pipelines.config import AugmentSection, DataSection
from pipelines.data.augment import augment_batch
from pipelines.data.epochs import EpochReader
from pipelines.data.image_cache import cache_encoding, ensure_image_cache

FRACTIONS = {"validation_fraction": 0.2, "test_fraction": 0.1}
SIZE = 24


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A JPEG corpus of noisy gradients (incompressible like photos), larger than the training
    size so that reading resizes, two classes, and one truncated file."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for c, name in enumerate(("a", "b")):
        (root / name).mkdir()
        for i in range(24):
            ramp = np.linspace(0, 200, 40)[None, :, None] + 40 * c
            pixels = np.clip(ramp + rng.normal(0, 25, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}{i:02d}.jpg", quality=90)
    good = (root / "a" / "a00.jpg").read_bytes()
    (root / "b" / "broken.jpg").write_bytes(good[: len(good) // 3])
    return root


def _data(source, **extra) -> DataSection:
    return DataSection(source=str(source), image_size=SIZE, **FRACTIONS, **extra)


def _all_images(cache) -> dict[str, np.ndarray]:
    reader = EpochReader.for_images(
        cache, "all", seed=0, shuffle_buffer=64, columns=("key", "image"), **FRACTIONS
    )
    return {
        str(k): img for b in reader.batches(0, 0, 1, 16) for k, img in zip(b["key"], b["image"])
    }


def _cache_bytes(cache) -> int:
    return sum(
        os.path.getsize(os.path.join(cache.directory, f))
        for f in os.listdir(cache.directory)
        if f.endswith(".parquet")
    )


def test_encoded_and_pixel_caches_read_the_same_pixels(ray_local, photos, tmp_path):
    pixels = ensure_image_cache(_data(photos, cache="pixels"), str(tmp_path))
    encoded = ensure_image_cache(_data(photos, cache="encoded"), str(tmp_path))
    assert (pixels.encoding, encoded.encoding) == ("pixels", "encoded")
    assert pixels.directory != encoded.directory
    assert pixels.rows == encoded.rows == 48 and pixels.bad_inputs == encoded.bad_inputs == 1
    a, b = _all_images(pixels), _all_images(encoded)
    assert a.keys() == b.keys() and len(a) == 48
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    # The encoded cache holds the JPEG files themselves (plus keys and hashes).
    jpegs = sum(p.stat().st_size for p in photos.rglob("*.jpg") if p.name != "broken.jpg")
    assert jpegs <= _cache_bytes(encoded) <= 1.2 * jpegs + 8192


def test_auto_caches_pixels_up_to_64x64_and_files_above():
    assert cache_encoding(DataSection(source="/x", image_size=64)) == "pixels"
    assert cache_encoding(DataSection(source="/x", image_size=(64, 72))) == "encoded"
    assert cache_encoding(DataSection(source="/x", image_size=256)) == "encoded"
    assert cache_encoding(DataSection(source="/x", image_size=256, cache="pixels")) == "pixels"


def test_augmentation_applies_to_the_train_split_only(ray_local, photos, tmp_path):
    cache = ensure_image_cache(_data(photos), str(tmp_path))
    on = AugmentSection(enabled=True)
    for split in ("validation", "test", "all"):
        with pytest.raises(ValueError, match=f"train split only, not '{split}'"):
            EpochReader.for_images(cache, split, seed=0, shuffle_buffer=64, augment=on, **FRACTIONS)
    # Switched off, the reader carries no augmentation at all.
    off = EpochReader.for_images(
        cache, "validation", seed=0, shuffle_buffer=64, augment=AugmentSection(), **FRACTIONS
    )
    assert off.augment is None


def _train_batches(cache, seed, augment):
    reader = EpochReader.for_images(
        cache,
        "train",
        seed=seed,
        shuffle_buffer=64,
        columns=("key", "image"),
        augment=augment,
        **FRACTIONS,
    )
    return list(reader.batches(0, 0, 1, 8))


def test_augmented_batches_are_reproducible_and_differ_from_the_plain_ones(
    ray_local, photos, tmp_path
):
    cache = ensure_image_cache(_data(photos), str(tmp_path))
    on = AugmentSection(enabled=True)
    first, second = _train_batches(cache, 0, on), _train_batches(cache, 0, on)
    plain = _train_batches(cache, 0, None)
    other = _train_batches(cache, 1, on)
    assert len(first) == len(plain) > 2
    for x, y, p in zip(first, second, plain):
        assert list(x["key"]) == list(y["key"]) == list(p["key"])  # the same images, in order
        np.testing.assert_array_equal(x["image"], y["image"])
        assert x["image"].shape == p["image"].shape == (len(p["key"]), SIZE, SIZE, 3)
    changed = np.mean([not np.array_equal(x["image"], p["image"]) for x, p in zip(first, plain)])
    assert changed == 1.0
    assert any(not np.array_equal(x["image"], o["image"]) for x, o in zip(first, other))


def test_flip_mirrors_about_half_and_crop_keeps_content():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (64, 8, 10, 3), dtype=np.uint8)
    flipped = augment_batch(images, AugmentSection(enabled=True, crop_scale=1.0), rng)
    mirrored = [np.array_equal(f, i[:, ::-1]) for f, i in zip(flipped, images)]
    kept = [np.array_equal(f, i) for f, i in zip(flipped, images)]
    assert all(m or k for m, k in zip(mirrored, kept))
    assert 16 < sum(mirrored) < 48
    # A crop of a 1.25x resize of a constant image is that constant.
    flat = np.full((4, 8, 8, 3), 77, dtype=np.uint8)
    out = augment_batch(flat, AugmentSection(enabled=True, crop_scale=1.25, flip=False), rng)
    assert out.shape == flat.shape and (out == 77).all()
    # Not the identity: a crop of an upscaled ramp shifts and stretches it.
    ramp = np.tile(np.arange(0, 240, 30, dtype=np.uint8)[None, :, None], (8, 1, 3))[None]
    cropped = augment_batch(ramp, AugmentSection(enabled=True, crop_scale=1.5, flip=False), rng)
    assert not np.array_equal(cropped, ramp)
