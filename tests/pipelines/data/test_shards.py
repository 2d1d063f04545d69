"""The code-shard format: dtypes, atomic content-named writes, and every reader agreeing."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest
import webdataset as wds

from pipelines.data import storage
from pipelines.data.epochs import EpochReader
from pipelines.data.keys import split_of
from pipelines.data.shards import (
    CodeShards,
    batch_codes,
    batch_keys,
    code_dataset,
    code_dtype,
    is_shard,
    iter_code_samples,
    iter_manifest_samples,
    key_index_uri,
    list_shards,
    read_code_map,
    read_first_sample,
    read_key_index,
    read_raw_shards,
    read_shard_keys,
    removed_table_bytes,
    sample_codes,
    shard_bytes,
    write_shard,
)


def test_code_dtype_is_the_smallest_unsigned_type_that_holds_k():
    assert code_dtype(1) == np.uint8
    assert code_dtype(256) == np.uint8
    assert code_dtype(257) == np.uint16
    assert code_dtype(65536) == np.uint16
    assert code_dtype(65537) == np.uint32
    with pytest.raises(ValueError, match="at least one code"):
        code_dtype(0)


def _samples(count: int, seed: int = 0, prefix: str = "img"):
    rng = np.random.default_rng(seed)
    keys = [f"{prefix}/{i:05d}" for i in range(count)]
    labels = rng.integers(0, 4, count).tolist()
    codes = {
        "top": rng.integers(0, 256, (count, 2, 3)).astype(np.uint8),
        "bottom": rng.integers(0, 1000, (count, 4, 6)).astype(np.uint16),
    }
    return keys, labels, codes


def test_written_shard_reads_back_with_tarfile_numpy_and_webdataset(tmp_path):
    keys, labels, codes = _samples(5)
    info = write_shard(str(tmp_path), keys, labels, codes)
    assert info.samples == 5 and info.bytes == os.path.getsize(info.uri)
    assert list_shards(str(tmp_path)) == [info.uri]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(storage.TMP_SUFFIX)]

    # Plain tarfile + numpy: the documented member layout.
    with tarfile.open(info.uri) as tar:
        names = tar.getnames()
        assert names[:3] == ["img/00000.top.npy", "img/00000.bottom.npy", "img/00000.cls"]
        top = np.load(io.BytesIO(tar.extractfile("img/00003.top.npy").read()), allow_pickle=False)
        bottom = np.load(io.BytesIO(tar.extractfile("img/00003.bottom.npy").read()))
        label = int(tar.extractfile("img/00003.cls").read())
    assert top.dtype == np.uint8 and bottom.dtype == np.uint16
    np.testing.assert_array_equal(top, codes["top"][3])
    np.testing.assert_array_equal(bottom, codes["bottom"][3])
    assert label == labels[3]

    # webdataset's own pipeline and its default (pickle-free) decoders.
    samples = list(wds.WebDataset(info.uri, shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == keys
    np.testing.assert_array_equal(samples[2]["bottom.npy"], codes["bottom"][2])
    assert samples[2]["cls"] == labels[2]

    # The module's reader and key listing.
    ours = list(iter_code_samples([info.uri]))
    assert [s["key"] for s in ours] == keys == read_shard_keys(info.uri)
    assert [s["label"] for s in ours] == labels
    np.testing.assert_array_equal(np.stack([s["top"] for s in ours]), codes["top"])


def test_shard_names_depend_on_content_so_rewrites_never_duplicate(tmp_path):
    keys, labels, codes = _samples(4)
    first = write_shard(str(tmp_path), keys, labels, codes)
    again = write_shard(str(tmp_path), keys, labels, codes)  # e.g. a retried writer task
    assert first == again
    assert list_shards(str(tmp_path)) == [first.uri]
    other = write_shard(str(tmp_path), keys[:2], labels[:2], {k: v[:2] for k, v in codes.items()})
    assert other.name != first.name
    assert shard_bytes(keys, labels, codes) == shard_bytes(keys, labels, codes)


def test_shard_writer_rejects_what_readers_could_not_read_back():
    keys, labels, codes = _samples(2)
    with pytest.raises(ValueError, match="dot in its last component"):
        shard_bytes(["a/b.c", "a/d"], labels, codes)
    with pytest.raises(ValueError, match="unsigned"):
        shard_bytes(keys, labels, {"top": codes["top"].astype(np.int64)})
    with pytest.raises(ValueError, match="N x h x w"):
        shard_bytes(keys, labels, {"top": codes["top"][:1]})
    with pytest.raises(ValueError, match="labels"):
        shard_bytes(keys, labels[:1], codes)


def test_code_dataset_streams_codes_by_split(tmp_path, ray_local):
    shards = []
    for s in range(3):
        keys, labels, codes = _samples(6, seed=s, prefix=f"part{s}")
        shards.append(write_shard(str(tmp_path), keys, labels, codes))
    manifest = CodeShards(
        shards=shards,
        levels=["top", "bottom"],
        code_shapes={"top": [2, 3], "bottom": [4, 6]},
        code_dtypes={"top": "uint8", "bottom": "uint16"},
        validation_fraction=0.3,
        test_fraction=0.2,
    )
    expected = {s["key"]: s for s in iter_code_samples([i.uri for i in shards])}

    everything = code_dataset(manifest, "all").take_all()
    assert sorted(r["key"] for r in everything) == sorted(expected)
    row = everything[0]
    assert row["bottom"].dtype == np.int64 and row["bottom"].shape == (4, 6)
    np.testing.assert_array_equal(row["bottom"], expected[row["key"]]["bottom"])
    assert row["label"] == expected[row["key"]]["label"]

    by_split = {
        split: {r["key"] for r in code_dataset(manifest, split).take_all()}
        for split in ("train", "validation", "test")
    }
    assert set().union(*by_split.values()) == set(expected)
    assert sum(map(len, by_split.values())) == len(expected)
    for split, keys in by_split.items():
        assert all(split_of(k, 0.3, 0.2) == split for k in keys)

    stored = code_dataset(manifest, "all", as_int64=False).take(1)[0]
    assert stored["top"].dtype == np.uint8


def test_key_index_is_written_before_its_shard_and_matches_it(tmp_path):
    keys, labels, codes = _samples(5)
    sources = [f"/corpus/{k}.png" for k in keys]
    info = write_shard(str(tmp_path), keys, labels, codes, sources=sources)
    index = read_key_index(info.uri).to_pydict()
    assert index == {"key": keys, "label": labels, "source": sources}
    assert os.path.exists(key_index_uri(info.uri))
    assert os.path.getmtime(key_index_uri(info.uri)) <= os.path.getmtime(info.uri)
    assert info.class_counts == {c: labels.count(c) for c in sorted(set(labels))}
    with pytest.raises(ValueError, match="5 keys but 1 sources"):
        write_shard(str(tmp_path), keys, labels, codes, sources=sources[:1])


def test_readers_skip_removed_samples_of_their_own_shard_only(tmp_path, ray_local):
    """A key removed from one shard and written again to another (an image removed, then added
    back) is read once, from the shard where it is live."""
    keys, labels, codes = _samples(4, seed=1)
    old = write_shard(str(tmp_path), keys, labels, codes)
    again = {k: v[1:2] + 1 for k, v in codes.items()}  # key 1 re-encoded with other codes
    new = write_shard(str(tmp_path), keys[1:2], labels[1:2], again)
    table = tmp_path / "removed.parquet"
    table.write_bytes(removed_table_bytes([(old.name, keys[1]), (old.name, keys[3])]))
    manifest = CodeShards(
        shards=[old, new],
        levels=["top", "bottom"],
        code_shapes={"top": [2, 3], "bottom": [4, 6]},
        code_dtypes={"top": "uint8", "bottom": "uint16"},
        validation_fraction=0.2,
        test_fraction=0.1,
        removed_table=str(table),
    )
    assert manifest.removed_keys() == {old.name: frozenset({keys[1], keys[3]})}
    live = sorted([keys[0], keys[1], keys[2]])

    streamed = {s["key"]: s for s in iter_manifest_samples(manifest)}
    assert sorted(streamed) == live
    np.testing.assert_array_equal(streamed[keys[1]]["top"], again["top"][0])

    rows = code_dataset(manifest, "all", as_int64=False).take_all()
    assert sorted(r["key"] for r in rows) == live
    np.testing.assert_array_equal(
        next(r for r in rows if r["key"] == keys[1])["top"], again["top"][0]
    )
    # The training reader (train_prior) skips the same samples.
    reader = EpochReader.for_code_shards(
        [old.uri, new.uri],
        ["top", "bottom"],
        "all",
        validation_fraction=0.2,
        test_fraction=0.1,
        seed=0,
        shuffle_buffer=4,
        columns=("key", "top"),
        removed=manifest.removed_keys(),
    )
    trained = {str(k): t for b in reader.batches(0, 0, 1, 2) for k, t in zip(b["key"], b["top"])}
    assert sorted(trained) == live
    np.testing.assert_array_equal(trained[keys[1]], again["top"][0])
    # Without the table every stored sample comes back.
    everything = CodeShards(**{**manifest.model_dump(), "removed_table": ""})
    assert len(code_dataset(everything, "all").take_all()) == 5


def test_shard_names_tell_shards_from_their_key_indexes_and_leftovers(tmp_path):
    keys, labels, codes = _samples(2)
    info = write_shard(str(tmp_path), keys, labels, codes)
    assert is_shard(info.uri) and is_shard(info.name)
    assert not is_shard(key_index_uri(info.uri))
    assert not is_shard(info.uri + ".5e6f7a8b" + storage.TMP_SUFFIX)
    assert not is_shard(str(tmp_path / "shard-00000.tar"))  # a WebDataset tar, not a code shard


def test_first_sample_of_a_code_shard_or_a_foreign_webdataset_tar(tmp_path):
    """What ``vqpipe decode`` checks before writing anything: the first sample's fields, read
    without the rest of the tar and without requiring a label."""
    keys, labels, codes = _samples(3)
    info = write_shard(str(tmp_path), keys, labels, codes)
    key, fields = read_first_sample(info.uri)
    assert key == keys[0] and sorted(fields) == ["bottom.npy", "cls", "top.npy"]
    first = sample_codes(fields)
    assert sorted(first) == ["bottom", "top"] and first["bottom"].dtype == np.uint16
    np.testing.assert_array_equal(first["top"], codes["top"][0])

    foreign = str(tmp_path / "foreign.tar")
    with wds.TarWriter(foreign) as sink:
        for i in range(2):
            sink.write({"__key__": f"x/{i}", "codes.npy": np.full((2, 2), i, np.uint8)})
    key, fields = read_first_sample(foreign)
    assert key == "x/0" and list(sample_codes(fields)) == ["codes"]

    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    assert read_first_sample(str(empty)) is None


def test_raw_batches_give_keys_and_the_levels_asked_for(tmp_path, ray_local):
    keys, labels, codes = _samples(4)
    info = write_shard(str(tmp_path), keys, labels, codes)
    batch = read_raw_shards([info.uri]).take_batch(4, batch_format="numpy")
    assert batch_keys(batch) == keys
    found = batch_codes(batch, ["top", "bottom", "middle"])  # middle: not in these shards
    assert sorted(found) == ["bottom", "top"]
    np.testing.assert_array_equal(found["bottom"], codes["bottom"])
    assert found["top"].dtype == np.uint8


def test_shard_members_are_read_only_dated_zero_and_refuse_dotted_names():
    # Reproducible bytes: every member has mode 0o444 and mtime 0, whatever the clock says.
    codes = {"top": np.arange(8, dtype=np.uint8).reshape(2, 2, 2)}
    data = shard_bytes(["a/x", "b.c/y"], [0, 1], codes)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["a/x.top.npy", "a/x.cls", "b.c/y.top.npy", "b.c/y.cls"]
    assert {(m.mode, m.mtime) for m in members} == {(0o444, 0)}
    for level in ("to.p", ""):
        with pytest.raises(ValueError, match="level names become file suffixes"):
            shard_bytes(["a"], None, {level: codes["top"][:1]})
    with pytest.raises(ValueError, match="a shard needs at least one level of codes"):
        shard_bytes(["a"], None, {})
    with pytest.raises(ValueError, match="'b/x.y' has a dot in its last component"):
        shard_bytes(["b/x.y"], None, {"top": codes["top"][:1]})


def test_a_stored_code_map_is_never_unpickled():
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        read_code_map(buffer.getvalue())
