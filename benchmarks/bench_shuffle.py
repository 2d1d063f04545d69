"""Batch composition and read throughput of the training read path on class-sorted corpora.

The worst layout for a training reader is a corpus stored class by class: every shard, Parquet
file or row group holds one class. This script builds such corpora (an image folder listed
class by class, image WebDataset shards, an image Parquet corpus, and code shards as tokenize
writes them), reads them the way the training stages do (``pipelines.data.epochs.EpochReader``: units
permuted per epoch from the seed, read a few at a time, a local shuffle buffer), and prints per
layout:

- the mean share of the majority class in a batch, beside the same figure for batches drawn
  uniformly at random from the same labels; the ratio must stay within 1.25;
- rows per CPU second of the reader with the shuffle and without it (units in stored order, no
  buffer), measured in the same run; the cost must stay under 10%. The reader runs in this
  process, so its CPU time (all threads) is its cost, and the figure holds on a busy machine,
  where wall-clock rates swing by tens of percent from one repeat to the next. Wall-clock rates
  are printed too.

    python benchmarks/bench_shuffle.py                 # 4 classes x 1024 images, batch 32
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
import tempfile
import time

import numpy as np

from pipelines.config import DataSection, TrainingKnobs
from pipelines.data.epochs import EpochReader
from pipelines.data.image_cache import ensure_image_cache
from pipelines.data.images import encode_png
from pipelines.data.shards import write_shard

MIX_LIMIT = 1.25
COST_LIMIT = 0.10


def majority_share(labels: list[np.ndarray], batch: int) -> float:
    full = [b for b in labels if len(b) == batch]
    return float(np.mean([np.bincount(b).max() / batch for b in full]))


def uniform_share(labels: np.ndarray, batch: int, rng: np.random.Generator, draws=2000) -> float:
    return majority_share([rng.choice(labels, batch, replace=False) for _ in range(draws)], batch)


def write_wds(root: str, images: np.ndarray, labels: np.ndarray, per_shard: int) -> None:
    os.makedirs(root)
    for start in range(0, len(labels), per_shard):
        with tarfile.open(os.path.join(root, f"shard-{start // per_shard:05d}.tar"), "w") as tar:
            for i in range(start, min(start + per_shard, len(labels))):
                for suffix, data in (
                    ("png", encode_png(images[i])),
                    ("cls", str(int(labels[i])).encode()),
                ):
                    info = tarfile.TarInfo(f"img{i:06d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def write_folder(root: str, images: np.ndarray, labels: np.ndarray, per_unit: int) -> None:
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = os.path.join(root, f"class_{label}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"img{i:06d}.png"), "wb") as f:
            f.write(encode_png(image))


def write_parquet(root: str, images: np.ndarray, labels: np.ndarray, per_file: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(root)
    for start in range(0, len(labels), per_file):
        part = slice(start, start + per_file)
        table = pa.table(
            {"image": [encode_png(x) for x in images[part]], "label": labels[part].tolist()}
        )
        pq.write_table(table, os.path.join(root, f"part-{start // per_file:05d}.parquet"))


def measure(reader: EpochReader, batch: int, epochs: int) -> tuple[list[np.ndarray], float, float]:
    """(label column of every batch, rows per CPU second, rows per wall-clock second), over
    ``epochs`` epochs."""
    labels, rows = [], 0
    cpu, wall = time.process_time(), time.perf_counter()
    for epoch in range(epochs):
        for b in reader.batches(epoch, 0, 1, batch):
            labels.append(np.asarray(b["label"]))
            rows += len(b["label"])
    return labels, rows / (time.process_time() - cpu), rows / (time.perf_counter() - wall)


def report(name: str, reader: EpochReader, all_labels: np.ndarray, args, rng) -> bool:
    unshuffled = EpochReader(**{**reader.__dict__, "shuffle": False})
    # Alternate the two so that a change in the machine's load hits both alike.
    shuffled_rates, plain_rates, shuffled_wall, plain_wall, shares = [], [], [], [], []
    for _ in range(args.repeats):
        labels, rate, wall = measure(reader, args.batch, args.epochs)
        shuffled_rates.append(rate)
        shuffled_wall.append(wall)
        shares.append(majority_share(labels, args.batch))
        plain_labels, rate, wall = measure(unshuffled, args.batch, args.epochs)
        plain_rates.append(rate)
        plain_wall.append(wall)
    share = float(np.mean(shares))
    uniform = uniform_share(all_labels, args.batch, rng)
    plain_share = majority_share(plain_labels, args.batch)
    fast, plain = float(np.median(shuffled_rates)), float(np.median(plain_rates))
    cost = 1 - fast / plain
    wall_cost = 1 - float(np.median(shuffled_wall)) / float(np.median(plain_wall))
    mixed = share / uniform <= MIX_LIMIT
    cheap = cost < COST_LIMIT
    print(
        f"{name:<22}{share:>9.3f}{plain_share:>9.3f}{uniform:>9.3f}{share / uniform:>8.2f}x"
        f"{fast:>11.0f}{plain:>11.0f}{cost:>8.1%}{wall_cost:>9.1%}  "
        f"{'ok' if mixed and cheap else 'FAIL'}"
    )
    return mixed and cheap


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=1024)
    parser.add_argument("--size", type=int, default=32, help="image side")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--per-unit", type=int, default=256, help="images per shard/file")
    parser.add_argument(
        "--buffer",
        type=int,
        default=TrainingKnobs().shuffle_buffer,
        help="shuffle buffer rows (default: the training stages' shuffle_buffer)",
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args(argv)

    import ray

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(args.classes), args.per_class)  # sorted by class
    images = rng.integers(0, 256, (len(labels), args.size, args.size, 3), dtype=np.uint8)
    common = {"seed": 0, "shuffle_buffer": args.buffer}
    print(
        f"{args.classes} classes x {args.per_class}, stored class by class, {args.per_unit} per "
        f"shard/file; batch {args.batch}, buffer {args.buffer}; load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'layout':<22}{'share':>9}{'no shuf':>9}{'uniform':>9}{'ratio':>9}"
        f"{'rows/cpu-s':>11}{'no shuf':>11}{'cost':>8}{'wall':>9}"
    )
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        layouts = (
            ("images, folder", write_folder),
            ("images, webdataset", write_wds),
            ("images, parquet", write_parquet),
        )
        for name, writer in layouts:
            source = os.path.join(tmp, name.split()[-1])
            writer(source, images, labels, args.per_unit)
            data = DataSection(
                source=source, image_size=args.size, validation_fraction=0, test_fraction=0
            )
            cache = ensure_image_cache(data, os.path.join(tmp, "out"))
            reader = EpochReader.for_images(
                cache,
                "train",
                validation_fraction=0,
                test_fraction=0,
                columns=("image", "label"),
                **common,
            )
            ok &= report(name, reader, labels, args, rng)

        shard_dir = os.path.join(tmp, "codes")
        codes = rng.integers(0, 512, (len(labels), 8, 8)).astype(np.uint16)
        uris = [
            write_shard(
                shard_dir,
                [f"img{i:06d}" for i in range(s, s + args.per_unit)],
                labels[s : s + args.per_unit].tolist(),
                {"top": codes[s : s + args.per_unit]},
            ).uri
            for s in range(0, len(labels), args.per_unit)
        ]
        reader = EpochReader.for_code_shards(
            uris,
            ["top"],
            "train",
            validation_fraction=0,
            test_fraction=0,
            columns=("top", "label"),
            **common,
        )
        ok &= report("code shards", reader, labels, args, rng)
    ray.shutdown()
    print(
        f"share: mean majority-class share per batch (uniform random batches: 'uniform'); "
        f"cost: CPU time of the shuffle (wall: the same in wall-clock time, load-sensitive); "
        f"limits: ratio <= {MIX_LIMIT}, cost < {COST_LIMIT:.0%}"
    )
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
