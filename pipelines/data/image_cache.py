"""The training images at the training resolution, cached as Parquet so a corpus is read once.

Training reads every image once per epoch. Decoding and resizing a PNG costs about as much as a
small model's training step on it, and a corpus of millions of small files in object storage costs
a request per file, so the training stage packs the corpus once, with Ray Data tasks in parallel,
into ``<output_dir>/cache/images-<digest>/``:

    part-<unit index>.parquet   one per work unit of the corpus (``Corpus.units``), rows in the
                                unit's fixed order, row groups of ``ROW_GROUP_ROWS`` rows; columns
                                key (string), label (int64), image, unit_hash (float64: what
                                ``split_of`` compares)
    cache.json                  written last: the parts, their row groups, the counts, the encoding

The ``image`` column holds, by ``data.cache``:

- ``pixels``: the decoded uint8 H x W x C pixels (fixed-size binary, zstd-compressed column).
  Reading costs a decompression; the bytes grow with the resolution (a 256x256 photo is about
  87 KB where its JPEG is 18 KB).
- ``encoded``: the image file's own bytes, as the corpus stores them; training decodes and
  resizes them while reading (``decode_image``, the same pixels as ``pixels`` gives), in a few
  threads. The cache is about the size of the corpus.
- ``auto`` (the default): ``pixels`` up to 64x64 images, where decoding would cost a noticeable
  share of a training step, ``encoded`` above, where decoded pixels outgrow the files they came
  from (``benchmarks/bench_resolution.py`` measures both).

Every image is decoded once while the cache is built, so bad inputs are found then, left out and
counted, whatever the encoding. The digest covers the corpus listing (paths, sizes, mtimes), the
encoding and every data setting that changes the decoded pixels or labels, not the split fractions
(splits are chosen when reading, from ``unit_hash``) nor augmentation (applied while reading). So a
second run, another stage or another split configuration reuses the cache, and an edited corpus
gets a new one. A part is named by its unit, and a unit's rows never depend on scheduling, so the
cache's bytes are the same however Ray ran the build, and a build that died half-way resumes by
keeping the parts it finished.
"""

from __future__ import annotations

import io
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.config import DataSection, without_neutral_defaults
from pipelines.data import storage
from pipelines.data.corpus import Corpus, open_corpus, raise_bad_inputs_as_themselves
from pipelines.data.images import decode_image
from pipelines.data.keys import unit_hashes
from pipelines.manifest import fingerprint

log = logging.getLogger("vqpipe")

FORMAT = "vqpipe.image_cache/2"
MARKER = "cache.json"
# Small row groups are the unit a training reader permutes: a pool of many random ones mixes
# classes even when each comes from a single-class shard.
ROW_GROUP_ROWS = 64
# Images of at most this many pixels are cached decoded when data.cache is "auto".
AUTO_PIXELS_MAX = 64 * 64
# Threads that decode an encoded cache's images while a training worker reads (PIL releases the
# GIL while it decodes).
DECODE_THREADS = min(4, os.cpu_count() or 1)


@dataclass(frozen=True)
class RowGroup:
    """One row group of a cache part (or, for code shards, a whole shard: ``row_group`` -1)."""

    uri: str
    row_group: int
    rows: int


@dataclass(frozen=True)
class ImageCache:
    """A complete cache: where it is, its row groups in a fixed order, and the image shape."""

    directory: str
    row_groups: tuple[RowGroup, ...]
    image_shape: tuple[int, int, int]  # H, W, C
    rows: int
    bad_inputs: int
    encoding: str = "pixels"  # "pixels" or "encoded" (see the module docstring)


def cache_encoding(data_cfg: DataSection) -> str:
    """``pixels`` or ``encoded``: what ``data.cache`` asks for, ``auto`` resolved by image size."""
    if data_cfg.cache != "auto":
        return data_cfg.cache
    height, width = data_cfg.size_hw
    return "pixels" if height * width <= AUTO_PIXELS_MAX else "encoded"


def cache_directory(data_cfg: DataSection, output_dir: str) -> str:
    """Where the cache of ``data_cfg``'s corpus at its current listing lives."""
    settings = without_neutral_defaults(
        "data",
        data_cfg.model_dump(
            mode="json",
            exclude={"validation_fraction", "test_fraction", "generate", "augment", "cache"},
        ),
    )
    settings["encoding"] = cache_encoding(data_cfg)
    digest = fingerprint(FORMAT, settings, storage.listing_fingerprint(data_cfg.source))
    return storage.join(output_dir, "cache", f"images-{digest}")


def _part_name(index: int) -> str:
    return f"part-{index:06d}.parquet"


def _build_part(
    batch: dict[str, np.ndarray], corpus: Corpus, directory: str, encoding: str
) -> dict[str, np.ndarray]:
    """Ray Data task: decode one work unit and write its part (unless an earlier build did)."""
    import pyarrow.parquet as pq

    index = int(batch["index"][0])
    uri = storage.join(directory, _part_name(index))
    if not storage.exists(uri):
        unit = json.loads(str(batch["unit"][0]))
        spec = corpus.read_spec("all", keep_errors=True, keep_payload=encoding == "encoded")
        storage.write_bytes(uri, _part_bytes(corpus.read_unit(unit, spec), corpus, encoding))
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        meta = pq.ParquetFile(f).metadata
    groups = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    bad = int((meta.metadata or {}).get(b"bad_inputs", b"0"))
    return {
        "index": np.array([index], dtype=np.int64),
        "groups": np.array([json.dumps(groups)], dtype=object),
        "bad": np.array([bad], dtype=np.int64),
    }


def _part_bytes(rows: dict[str, np.ndarray] | None, corpus: Corpus, encoding: str) -> bytes:
    """A cache part: the unit's good rows as Parquet, the count of bad ones in its metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    height, width = corpus.cfg.size_hw
    keys: list[str] = []
    labels: list[int] = []
    images: list[bytes] = []
    bad = 0
    if rows is not None:
        column = rows["payload"] if encoding == "encoded" else rows["image"]
        for key, label, image, error in zip(rows["key"], rows["label"], column, rows["error"]):
            if error:
                bad += 1
                continue
            keys.append(str(key))
            labels.append(int(label))
            if encoding == "encoded":
                images.append(bytes(image))
            else:
                images.append(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
    image_type = (
        pa.binary() if encoding == "encoded" else pa.binary(height * width * corpus.cfg.channels)
    )
    table = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "label": pa.array(labels, pa.int64()),
            "image": pa.array(images, image_type),
            "unit_hash": pa.array(unit_hashes(keys), pa.float64()),
        }
    )
    buffer = io.BytesIO()
    # The bad count travels in the file's metadata, so a resumed build still reports it.
    table = table.replace_schema_metadata({"bad_inputs": str(bad)})
    # zstd halves decoded pixels of photos (snappy, Parquet's default, saves almost nothing);
    # encoded files are compressed already.
    compression = {"image": "none" if encoding == "encoded" else "zstd"}
    pq.write_table(table, buffer, row_group_size=ROW_GROUP_ROWS, compression=compression)
    return buffer.getvalue()


def _read_marker(directory: str) -> ImageCache | None:
    marker = storage.join(directory, MARKER)
    if not storage.exists(marker):
        return None
    info = json.loads(storage.read_bytes(marker))
    groups = tuple(
        RowGroup(storage.join(directory, name), g, rows)
        for name, sizes in info["parts"]
        for g, rows in enumerate(sizes)
    )
    return ImageCache(
        directory,
        groups,
        tuple(info["image_shape"]),
        int(info["rows"]),
        int(info["bad_inputs"]),
        info["encoding"],
    )


def ensure_image_cache(data_cfg: DataSection, output_dir: str) -> ImageCache:
    """The decoded-image cache of ``data_cfg``'s corpus, built with Ray Data if it is missing."""
    import ray

    directory = cache_directory(data_cfg, output_dir)
    cached = _read_marker(directory)
    if cached is not None:
        log.info("image cache: reusing %s (%d images)", directory, cached.rows)
        return cached
    corpus = open_corpus(data_cfg)
    units = corpus.units()
    if not units:
        raise ValueError(f"data.source {data_cfg.source!r} holds no images")
    encoding = cache_encoding(data_cfg)
    storage.makedirs(directory)
    storage.remove_partials(directory)
    log.info("image cache (%s): building %s from %d work unit(s)", encoding, directory, len(units))
    items = [{"index": i, "unit": json.dumps(unit)} for i, unit in enumerate(units)]
    raise_bad_inputs_as_themselves()
    results = (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(
            _build_part,
            batch_size=1,
            batch_format="numpy",
            fn_kwargs={"corpus": corpus, "directory": directory, "encoding": encoding},
        )
        .take_all()
    )
    results.sort(key=lambda r: int(r["index"]))
    parts = [[_part_name(int(r["index"])), json.loads(r["groups"])] for r in results]
    rows = sum(sum(sizes) for _, sizes in parts)
    bad = sum(int(r["bad"]) for r in results)
    height, width = data_cfg.size_hw
    info: dict[str, Any] = {
        "format": FORMAT,
        "parts": parts,
        "rows": rows,
        "bad_inputs": bad,
        "image_shape": [height, width, data_cfg.channels],
        "encoding": encoding,
    }
    storage.write_bytes(storage.join(directory, MARKER), json.dumps(info, indent=1).encode())
    log.info("image cache: %d images in %d parts, %d bad inputs left out", rows, len(parts), bad)
    cached = _read_marker(directory)
    assert cached is not None
    return cached


def read_row_group(
    group: RowGroup, image_shape: tuple[int, int, int], encoding: str = "pixels"
) -> dict[str, np.ndarray]:
    """One row group as numpy: key (object), label (int64), image (uint8 N x H x W x C),
    unit_hash (float64). An encoded cache's images are decoded here."""
    import pyarrow.parquet as pq

    fs, path = storage.resolve(group.uri)
    with fs.open_input_file(path) as f:
        table = pq.ParquetFile(f).read_row_group(group.row_group)
    column = table.column("image").combine_chunks()
    if encoding == "encoded":
        images = _decode_all(column.to_pylist(), image_shape)
    else:
        n = len(column)
        width = column.type.byte_width
        pixels = np.frombuffer(
            column.buffers()[1], dtype=np.uint8, count=n * width, offset=column.offset * width
        )
        images = pixels.reshape(n, *image_shape)
    return {
        "key": np.array(table.column("key").to_pylist(), dtype=object),
        "label": table.column("label").to_numpy(),
        "image": images,
        "unit_hash": table.column("unit_hash").to_numpy(),
    }


_decoder: ThreadPoolExecutor | None = None


def _decode_all(files: list[bytes], image_shape: tuple[int, int, int]) -> np.ndarray:
    """Decode and resize image files exactly as the cache's build did (they decoded then)."""
    global _decoder
    height, width, channels = image_shape
    out = np.empty((len(files), height, width, channels), dtype=np.uint8)

    def one(i: int) -> None:
        out[i] = decode_image(files[i], (height, width), channels)

    if len(files) < 2 or DECODE_THREADS < 2:
        for i in range(len(files)):
            one(i)
        return out
    if _decoder is None:
        _decoder = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="image-decode")
    list(_decoder.map(one, range(len(files))))
    return out
