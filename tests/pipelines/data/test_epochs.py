"""The training read path: the decoded-image cache and the seeded per-rank epoch reader."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import DataSection
from pipelines.data.corpus import open_corpus
from pipelines.data.demo_data import generate_corpus
from pipelines.data.epochs import EpochReader
from pipelines.data.image_cache import ensure_image_cache
from pipelines.data.images import encode_png
from pipelines.data.keys import split_of
from pipelines.data.shards import write_shard

CLASSES = ("circle", "cross", "square", "triangle")
FRACTIONS = {"validation_fraction": 0.2, "test_fraction": 0.1}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    generate_corpus(str(root), classes=CLASSES, images_per_class=40, image_size=16, corrupt_files=2)
    return str(root)


def _data(source: str, **extra) -> DataSection:
    return DataSection(source=source, image_size=16, **FRACTIONS, **extra)


def _reader(cache, split="train", seed=0, buffer=64, columns=("key", "label")) -> EpochReader:
    return EpochReader.for_images(
        cache, split, seed=seed, shuffle_buffer=buffer, columns=columns, **FRACTIONS
    )


def _keys(batches) -> list[str]:
    return [str(k) for b in batches for k in b["key"]]


def test_cache_holds_every_valid_image_decoded_once_and_is_reused(ray_local, folder, tmp_path):
    data = _data(folder)
    cache = ensure_image_cache(data, str(tmp_path))
    expected = {
        str(r["key"]): r for r in open_corpus(data).dataset("all").take_all()
    }  # the corpus reader's own decoding
    assert cache.rows == len(expected) == len(CLASSES) * 40
    assert cache.bad_inputs == 2
    rows = {}
    reader = _reader(cache, "all", columns=("key", "label", "image"))
    for batch in reader.batches(0, 0, 1, 32):
        for key, label, image in zip(batch["key"], batch["label"], batch["image"]):
            rows[str(key)] = (int(label), image)
    assert set(rows) == set(expected)
    for key, (label, image) in rows.items():
        assert label == expected[key]["label"]
        np.testing.assert_array_equal(image, expected[key]["image"])

    parts = sorted(os.listdir(cache.directory))
    stamps = {p: os.stat(os.path.join(cache.directory, p)).st_mtime_ns for p in parts}
    again = ensure_image_cache(data, str(tmp_path))  # a second run or another stage
    assert again == cache
    assert {p: os.stat(os.path.join(cache.directory, p)).st_mtime_ns for p in parts} == stamps


def test_each_epoch_is_a_seeded_permutation_split_between_ranks(ray_local, folder, tmp_path):
    cache = ensure_image_cache(_data(folder), str(tmp_path))
    reader = _reader(cache)
    train = {str(r["key"]) for r in open_corpus(_data(folder)).dataset("train").take_all()}
    epoch0 = [_keys(reader.batches(0, rank, 2, 8)) for rank in (0, 1)]
    # Two ranks: disjoint, and together every training image exactly once.
    assert not set(epoch0[0]) & set(epoch0[1])
    assert sorted(epoch0[0] + epoch0[1]) == sorted(train)
    assert all(split_of(k, **FRACTIONS) == "train" for k in epoch0[0])
    # The same seed and epoch give the same batches; another epoch or seed another order.
    assert _keys(reader.batches(0, 0, 2, 8)) == epoch0[0]
    assert _keys(reader.batches(1, 0, 1, 8)) != _keys(reader.batches(0, 0, 1, 8))
    assert _keys(_reader(cache, seed=1).batches(0, 0, 1, 8)) != _keys(reader.batches(0, 0, 1, 8))
    sizes = [len(b["key"]) for b in reader.batches(0, 0, 1, 8)]
    assert all(s == 8 for s in sizes[:-1]) and sum(sizes) == len(train)


def _majority_share(batches) -> float:
    shares = []
    for b in batches:
        if len(b["label"]) == 32:
            shares.append(np.bincount(b["label"]).max() / 32)
    return float(np.mean(shares))


def _random_share(labels: np.ndarray, rng: np.random.Generator, batches: int = 400) -> float:
    picks = [rng.choice(labels, 32, replace=False) for _ in range(batches)]
    return float(np.mean([np.bincount(p).max() / 32 for p in picks]))


def test_batches_mix_classes_of_a_class_sorted_parquet_corpus(ray_local, tmp_path):
    # Four single-class Parquet files, each class in its own row groups: the worst layout.
    source = tmp_path / "sorted"
    source.mkdir()
    rng = np.random.default_rng(0)
    for label in range(4):
        images = [encode_png(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(512)]
        table = pa.table({"image": images, "label": [label] * 512})
        # 16 row groups per class, as many as the reader interleaves: only the permutation of
        # the row groups brings several classes into the buffer at once.
        pq.write_table(table, source / f"class-{label}.parquet", row_group_size=32)
    data = DataSection(source=str(source), image_size=8, validation_fraction=0.0, test_fraction=0.0)
    cache = ensure_image_cache(data, str(tmp_path / "out"))
    reader = _reader(cache, buffer=512, columns=("label",))
    shares = [_majority_share(reader.batches(epoch, 0, 1, 32)) for epoch in range(3)]
    uniform = _random_share(np.repeat(np.arange(4), 512), rng)
    assert np.mean(shares) < 1.25 * uniform, (shares, uniform)


def test_code_shards_are_read_per_rank_by_split(tmp_path):
    keys = [f"k{i:04d}" for i in range(90)]
    codes = np.arange(90, dtype=np.uint16)[:, None, None] * np.ones((1, 2, 2), np.uint16)
    shards = [
        write_shard(str(tmp_path), keys[i : i + 30], [i // 30] * 30, {"codes": codes[i : i + 30]})
        for i in range(0, 90, 30)
    ]
    reader = EpochReader.for_code_shards(
        [s.uri for s in shards],
        ["codes"],
        "train",
        seed=3,
        shuffle_buffer=16,
        columns=("key", "codes", "label"),
        **FRACTIONS,
    )
    train = {k for k in keys if split_of(k, **FRACTIONS) == "train"}
    # Three shards, four ranks: every rank reads every shard and keeps every fourth row.
    per_rank = [list(reader.batches(0, rank, 4, 5)) for rank in range(4)]
    seen = [k for batches in per_rank for k in _keys(batches)]
    assert sorted(seen) == sorted(train)
    assert all(_keys(batches) for batches in per_rank)  # no rank is left without data
    for batch in per_rank[0]:
        assert batch["codes"].dtype == np.uint16 and batch["codes"].shape[1:] == (2, 2)
        for key, code, label in zip(batch["key"], batch["codes"], batch["label"]):
            assert int(code[0, 0]) == int(key[1:]) and label == int(key[1:]) // 30
    assert _keys(reader.batches(0, 1, 4, 5)) == _keys(per_rank[1])
