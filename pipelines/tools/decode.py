"""Code shards back to images: ``vqpipe decode --checkpoint CKPT --input SHARDS --output DIR``.

The inverse of tokenize, at the same scale: Ray Data reads the shards, an actor pool of decoders
(each loads the autoencoder once) turns every sample's code maps into an image, and each image is
written to ``<output>/<key>.png``, so a folder corpus comes back in its own layout
(``circle/00012`` -> ``circle/00012.png``).

``--input`` is a tokenize stage's folder (its manifest names the shards), a folder of ``.tar``
shards, one shard, or a brace pattern. Any WebDataset shards whose
samples hold one ``<level>.npy`` member per code level of the autoencoder, and no other (``top.npy``
and ``bottom.npy`` for the default VQ-VAE-2, one per named level for a deeper one, ``codes.npy``
for a one-level model) can be decoded, so a user who trains another prior on the codes can look
at its samples.

Nothing is written until the checkpoint is known to be an autoencoder and the first sample's
code maps match it in levels (names and number), shape and dtype; every later batch is checked
alike. The shards are read through ``pipelines.data.shards``, the module that writes them.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from pipelines.data import storage
from pipelines.data.shards import (
    SHARD_SUFFIX,
    batch_codes,
    batch_keys,
    check_levels,
    levels_of,
    read_first_sample,
    read_raw_shards,
    sample_codes,
)
from pipelines.errors import InputError, MissingInputError
from pipelines.tools.reconstruct import load_autoencoder

log = logging.getLogger("vqpipe")


def shard_uris(source: str) -> list[str]:
    """The shards ``source`` names: a tokenize stage folder, a folder of .tar files, a .tar file
    or a brace pattern."""
    from pipelines.data.corpus import _files_with_suffix

    if "{" not in source and not storage.exists(source):
        raise MissingInputError(f"--input {source!r} does not exist")
    manifest_uri = storage.join(source, "manifest.json")
    if "{" not in source and storage.is_dir(source) and storage.exists(manifest_uri):
        from pipelines.manifest import read_manifest
        from pipelines.stage_manifests import TokenizeManifest

        output_dir = source.rstrip("/").rsplit("/", 1)[0]
        manifest = read_manifest(output_dir, TokenizeManifest)
        if manifest is not None:
            return [shard.uri for shard in manifest.shards]
    uris = _files_with_suffix(source, SHARD_SUFFIX)
    if not uris:
        raise MissingInputError(f"--input {source!r} holds no .tar shards")
    return uris


def check_codes(
    codes: dict[str, np.ndarray], model: Any, size_hw: tuple[int, int], where: str
) -> None:
    """Raise InputError unless ``codes`` (level -> N x h x w, or h x w; every level the samples
    hold) fit the autoencoder: its levels exactly, and each level's shape, dtype and range."""
    expected = dict(zip(model.levels, model.code_shape(*size_hw)))
    check_levels(list(codes), list(model.levels), where, "the autoencoder")
    for level, k in zip(model.levels, model.codebook_sizes):
        array = codes[level]
        shape = tuple(array.shape[-2:])
        if shape != tuple(expected[level]) or array.dtype.kind not in "ui":
            raise InputError(
                f"{where}: {level} codes are {array.dtype} {shape}; the autoencoder decodes "
                f"integer {tuple(expected[level])} maps"
            )
        if array.size and (int(array.min()) < 0 or int(array.max()) >= k):
            raise InputError(
                f"{where}: {level} codes range over [{int(array.min())}, {int(array.max())}], "
                f"outside the codebook of {k}"
            )


class CodeDecoder:
    """Ray Data actor: loads the autoencoder once, decodes code maps and writes the images."""

    def __init__(self, checkpoint: str, output: str, size_hw: tuple[int, int], threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.model, _ = load_autoencoder(checkpoint)
        self.model.eval()
        self.output, self.size_hw = output, size_hw

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from pipelines.data.images import encode_png, to_uint8

        keys = batch_keys(batch)
        codes = batch_codes(batch, levels_of(batch))
        check_codes(codes, self.model, self.size_hw, f"samples {keys[0]!r}..{keys[-1]!r}")
        with torch.inference_mode():
            images = self.model.decode_codes(
                tuple(
                    torch.from_numpy(codes[level].astype(np.int64)) for level in self.model.levels
                )
            )
        pixels = to_uint8(images.float().clamp(-1, 1))
        for key, image in zip(keys, pixels):
            storage.write_bytes(storage.join(self.output, f"{key}.png"), encode_png(image))
        return {"written": np.array([len(keys)], dtype=np.int64)}


def decode_shards(
    checkpoint: str,
    source: str,
    output: str,
    *,
    image_size: tuple[int, ...] | None = None,
    batch_size: int = 64,
    num_actors: int = 1,
    cpus_per_actor: float = 1.0,
) -> dict[str, Any]:
    """Decode every sample of the shards at ``source`` into ``<output>/<key>.png``."""
    import ray

    model, meta = load_autoencoder(checkpoint)
    size = image_size or meta.image_size
    if size is None:
        raise InputError(f"{checkpoint!r} does not record its image size; pass --image-size H [W]")
    size_hw = (int(size[0]), int(size[-1]))
    uris = shard_uris(source)
    first = read_first_sample(uris[0])
    if first is None:
        raise InputError(f"shard {uris[0]!r} holds no samples")
    first_key, first_fields = first
    check_codes(sample_codes(first_fields), model, size_hw, f"sample {first_key!r} of {uris[0]}")

    dataset = read_raw_shards(uris).map_batches(
        CodeDecoder,
        fn_constructor_kwargs={
            "checkpoint": checkpoint,
            "output": output,
            "size_hw": size_hw,
            "threads": int(cpus_per_actor),
        },
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=cpus_per_actor,
        batch_size=batch_size,
        batch_format="numpy",
    )
    started = time.perf_counter()
    written = sum(int(row["written"]) for row in dataset.iter_rows())
    seconds = time.perf_counter() - started
    log.info("decoded %d images from %d shard(s) into %s", written, len(uris), output)
    return {
        "written": written,
        "shards": len(uris),
        "seconds": round(seconds, 2),
        "images_per_second": written / seconds if seconds > 0 else 0.0,
        "output": output,
    }
