"""Benchmark ``vqpipe decode``: Ray Data against a bare single-process loop.

Both decode the same code shards with the same autoencoder (the demo's sizes, K = 512 per level),
the same batch size and thread count, and write one PNG per sample: the bare loop reads the shards
with the project's WebDataset reader and decodes in this process; the stage runs Ray Data's reader
tasks and an actor pool of decoders. The stage's steady state is its marginal rate between the N
and scale x N runs, so its fixed costs (starting an actor, loading the model) cancel. Prints the
ratio bare / Ray (the target is at most 1.3).

    python -m benchmarks.bench_decode --samples 2000 --scale 4
"""

from __future__ import annotations

import argparse
import inspect
import os
import tempfile
import time

import numpy as np
import torch

from benchmarks.bench_tokenize import MODEL  # the demo's autoencoder with K = 512 per level
from pipelines.checkpoint_meta import CheckpointMeta, save_with_meta
from pipelines.config import RaySection
from pipelines.data.images import encode_png, to_uint8
from pipelines.data.shards import code_dtype, iter_code_samples, write_shard
from pipelines.stage import ensure_ray
from pipelines.tools.decode import decode_shards
from vq_core.vqvae import VQVAE2, VQVAE2Config

SHARD = 500


def write_codes(folder: str, count: int, size: int, seed: int) -> list[str]:
    """Shards of ``count`` samples with uniformly random codes of a size x size image."""
    rng = np.random.default_rng(seed)
    dtype = code_dtype(512)
    uris = []
    for start in range(0, count, SHARD):
        n = min(SHARD, count - start)
        keys = [f"c{(start + i) % 10}/{seed:02d}-{start + i:07d}" for i in range(n)]
        codes = {
            "top": rng.integers(0, 512, (n, size // 8, size // 8)).astype(dtype),
            "bottom": rng.integers(0, 512, (n, size // 4, size // 4)).astype(dtype),
        }
        uris.append(write_shard(folder, keys, [0] * n, codes).uri)
    return uris


def bare_loop(model: VQVAE2, uris: list[str], output: str, batch_size: int) -> float:
    """Seconds for the plain loop: read, decode, encode PNG, write."""
    started = time.perf_counter()
    batch: list[dict] = []

    def flush() -> None:
        with torch.inference_mode():
            top = torch.from_numpy(np.stack([s["top"] for s in batch]).astype(np.int64))
            bottom = torch.from_numpy(np.stack([s["bottom"] for s in batch]).astype(np.int64))
            images = to_uint8(model.decode_codes((top, bottom)).clamp(-1, 1))
        for sample, image in zip(batch, images):
            path = os.path.join(output, sample["key"] + ".png")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(encode_png(image))
        batch.clear()

    for sample in iter_code_samples(uris):
        batch.append(sample)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2000, help="N")
    parser.add_argument("--scale", type=int, default=4, help="the second run decodes scale x N")
    parser.add_argument("--image-size", type=int, default=32)
    decode_batch = inspect.signature(decode_shards).parameters["batch_size"].default
    parser.add_argument("--batch-size", type=int, default=decode_batch, help="both sides")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = VQVAE2(VQVAE2Config(**MODEL)).eval()
    ensure_ray(argparse.Namespace(ray=RaySection()))
    with tempfile.TemporaryDirectory() as work:
        checkpoint = os.path.join(work, "model.pt")
        save_with_meta(model, checkpoint, CheckpointMeta(image_size=[args.image_size] * 2))
        small = os.path.join(work, "small")
        large = os.path.join(work, "large")
        write_codes(small, args.samples, args.image_size, seed=1)
        large_uris = write_codes(large, args.samples * args.scale, args.image_size, seed=2)

        bare = bare_loop(model, large_uris, os.path.join(work, "bare"), args.batch_size)
        bare_rate = args.samples * args.scale / bare
        runs = {}
        for name, folder in (("small", small), ("large", large)):
            summary = decode_shards(
                checkpoint,
                folder,
                os.path.join(work, f"ray-{name}"),
                batch_size=args.batch_size,
                cpus_per_actor=float(args.threads),
            )
            runs[name] = summary
        extra = runs["large"]["written"] - runs["small"]["written"]
        steady = extra / (runs["large"]["seconds"] - runs["small"]["seconds"])
    load = os.getloadavg()[0]
    print(f"decode, {args.image_size}x{args.image_size}, K=512, batch {args.batch_size}")
    print(f"  bare loop:               {bare_rate:8.1f} images/s")
    print(f"  Ray Data (steady state): {steady:8.1f} images/s")
    print(
        f"  Ray Data (whole run, {runs['large']['written']}): "
        f"{runs['large']['images_per_second']:8.1f} images/s"
    )
    print(f"  overhead bare / Ray:     {bare_rate / steady:8.2f}x (target <= 1.3)")
    print(f"  machine load (1 min):    {load:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
