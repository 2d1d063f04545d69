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
    shard_name,
    write_shard,
)
from pipelines.errors import InputError


def test_code_dtype_is_the_smallest_unsigned_type_that_holds_k():
    assert code_dtype(1) == np.uint8
    assert code_dtype(256) == np.uint8
    assert code_dtype(257) == np.uint16
    assert code_dtype(65536) == np.uint16
    assert code_dtype(65537) == np.uint32
    with pytest.raises(ValueError, match="at least one code"):
        code_dtype(0)
    with pytest.raises(ValueError, match="codebook of 4294967297 codes does not fit in uint32"):
        code_dtype(2**32 + 1)


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
    # The name is the first 12 hex digits of the SHA-1 of the keys, one per line, in order.
    assert shard_name(["circle/00000", "circle/00001", "square/00000"]) == "codes-22c006218456.tar"
    assert key_index_uri("s3://b/run/tokenize/codes-22c006218456.tar") == (
        "s3://b/run/tokenize/codes-22c006218456.keys.parquet"
    )
    with pytest.raises(ValueError, match="'s3://b/x.parquet' is not a shard"):
        key_index_uri("s3://b/x.parquet")
    # A shard of a subfolder is another set's: not listed with this folder's.
    nested = write_shard(str(tmp_path / "more"), keys[:1], labels[:1], {"top": codes["top"][:1]})
    assert list_shards(str(tmp_path)) == [info.uri]
    assert list_shards(str(tmp_path / "more")) == [nested.uri]


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


def test_member_names_split_at_the_first_dot_of_their_last_component(tmp_path):
    """A tar member's key and field, split as WebDataset splits them: keys with no folder or with
    a dot in a folder read back whole; a tar made by other tools may hold folder entries and files
    that are no sample's field, and they are no samples."""
    codes = {"top": np.zeros((3, 1, 1), np.uint8)}
    shard = write_shard(str(tmp_path), ["img7", "a/b.c/y", "a/z"], [0, 1, 2], codes)
    assert read_shard_keys(shard.uri) == ["img7", "a/b.c/y", "a/z"]

    npy = io.BytesIO()
    np.save(npy, np.ones((2, 2), np.uint8))
    foreign = tmp_path / "made-by-tar.tar"
    members = [("v1.0", None), ("v1.0/README", b"x"), ("v1.0/.cls", b"1")]
    members += [("v1.0/s.codes.npy", npy.getvalue())]
    with tarfile.open(foreign, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
            else:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    key, fields = read_first_sample(str(foreign))
    assert key == "v1.0/s" and list(fields) == ["codes.npy"]
    assert read_shard_keys(str(foreign)) == ["v1.0/s"]


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
    data = shard_bytes(["a/x", "a/b.c/y"], [0, 1], codes)  # a dot in a folder is fine
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [
        "a/x.top.npy", "a/x.cls", "a/b.c/y.top.npy", "a/b.c/y.cls"
    ]  # fmt: skip
    assert {(m.mode, m.mtime) for m in members} == {(0o444, 0)}
    for level in ("to.p", ""):
        with pytest.raises(ValueError, match="level names become file suffixes"):
            shard_bytes(["a"], None, {level: codes["top"][:1]})
    with pytest.raises(ValueError, match="^a shard needs at least one level of codes$"):
        shard_bytes(["a"], None, {})
    with pytest.raises(ValueError, match="'b/x.y' has a dot in its last component"):
        shard_bytes(["b/x.y"], None, {"top": codes["top"][:1]})


def test_a_stored_code_map_is_never_unpickled():
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        read_code_map(buffer.getvalue())


def test_the_plain_reader_skips_removed_keys_of_their_own_shard_only(tmp_path):
    """``iter_code_samples`` without Ray (what ``vqpipe decode`` checks and the unions read): a
    removed key is skipped in the shard it was removed from, in any folder, and read in another."""
    keys, labels, codes = _samples(4, seed=2)
    old = write_shard(str(tmp_path / "run" / "tokenize"), keys, labels, codes)
    other = write_shard(str(tmp_path / "elsewhere"), keys[2:3], labels[2:3],
                        {k: v[2:3] for k, v in codes.items()})  # fmt: skip
    removed = {old.name: frozenset({keys[1]}), "codes-000000000000.tar": frozenset({keys[2]})}
    read = list(iter_code_samples([old.uri, other.uri], ["top", "bottom"], removed=removed))
    # keys[1] only is skipped, and the samples after it still come; keys[2] twice (both live).
    assert [s["key"] for s in read] == [keys[0], keys[2], keys[3], keys[2]]
    assert [s["label"] for s in read] == [labels[0], labels[2], labels[3], labels[2]]
    np.testing.assert_array_equal(read[2]["bottom"], codes["bottom"][3])


def test_unlabelled_shards_read_with_label_minus_one_and_labelled_reading_names_the_sample(
    tmp_path,
):
    keys, _, codes = _samples(3, seed=3)
    info = write_shard(str(tmp_path), keys, None, codes)
    assert info.class_counts == {}
    index = read_key_index(info.uri)
    assert index.schema.field("label").type == "int64"  # null labels, still typed
    assert index.to_pydict() == {"key": keys, "label": [None] * 3, "source": [""] * 3}
    assert read_key_index(info.uri, columns=["key"]).column_names == ["key"]

    read = list(iter_code_samples([info.uri], ["top", "bottom"], labelled=False))
    assert [(s["key"], s["label"]) for s in read] == [(k, -1) for k in keys]
    np.testing.assert_array_equal(read[1]["top"], codes["top"][1])
    with pytest.raises(ValueError, match=f"sample '{keys[0]}' in {info.uri} has no .cls"):
        next(iter_code_samples([info.uri], ["top", "bottom"]))


def test_the_plain_reader_refuses_samples_of_other_levels_naming_them(tmp_path):
    keys, labels, codes = _samples(2, seed=4)
    info = write_shard(str(tmp_path), keys, labels, codes)
    with pytest.raises(InputError) as err:
        next(iter_code_samples([info.uri], ["codes"]))
    assert str(err.value) == (
        f"sample '{keys[0]}' in {info.uri} holds the code levels ['bottom', 'top'], but its set "
        "of code shards (its tokenizer) has the levels ['codes']: these shards were not written "
        "by that tokenizer"
    )
    # Without levels, whatever levels each sample holds.
    assert sorted(next(iter_code_samples([info.uri]))) == ["bottom", "key", "label", "top"]
