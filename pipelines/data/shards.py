"""The code-shard format: how tokenized images are stored, written and read back.

A shard is a plain POSIX tar file named ``codes-<12 hex digits>.tar`` that WebDataset reads as is.
Each sample is one input image:

    <key>.<level>.npy   one per code level of the tokenizer, named after it ("top.npy" and
                        "bottom.npy" for the default VQ-VAE-2, also "middle.npy" for one with levels
                        top, middle, bottom; "codes.npy" for a one-level model): an h x w array in
                        the smallest unsigned dtype that holds the level's codebook (uint8 for
                        K <= 256, uint16 for K <= 65536, else uint32)
    <key>.cls           the integer class label as ASCII digits; absent in the shards of an
                        unlabelled corpus (``CodeShards.labelled`` false), whose samples have
                        no class

Keys are the corpus keys (``pipelines.data.keys``): "/"-separated, no dot in the last component, so a
WebDataset reader splits ``circle/00012.top.npy`` into key ``circle/00012`` and field ``top.npy``.
Every reader here that knows the levels a set of shards should hold (its manifest's, the
tokenizer's) refuses a sample holding other ones (``check_levels``), naming both lists.
The sample's split is not stored: it is ``pipelines.data.keys.split_of(key, validation_fraction,
test_fraction)``, the same function that split the images, with the fractions recorded in the
tokenize manifest.

A shard's name is a hash of the keys it holds. Writing is atomic (temporary name, then rename), so a
name that exists is a complete shard; and a writer that is retried after a crash rewrites the same
name instead of adding a duplicate. Tar headers carry no timestamps or owners, so a shard's bytes
depend only on its samples.

Beside each shard lies its key index, ``codes-<hash>.keys.parquet``: one row per sample (key,
label (null for an unlabelled corpus), the source file it was made from). It is written before the shard, so a shard that exists
always has one; it is what an incremental run reads to skip finished images and to find samples
whose source file left the corpus, without opening a single tar. Such removed samples stay in
their shard (rewriting shards would change their bytes under running readers); a set of code
shards names them in a Parquet table (``CodeShards.removed_table``, columns shard and key) and
every reader here drops them.

``codes.wids.json`` indexes the shards in the format of WebDataset's ``wids`` package
(``wids.ShardListDataset("codes.wids.json")``): shard names relative to the index and their
stored sample counts. It lists what the tars hold, removed samples included.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import closing
from typing import Any

import numpy as np

from pipelines.data import storage
from pipelines.data.keys import SPLITS, split_mask, unit_hashes
from pipelines.errors import InputError, MissingInputError
from pipelines.manifest import ManifestModel

SHARD_PREFIX = "codes-"
SHARD_SUFFIX = ".tar"
SHARD_PATTERN = re.compile(rf"^{re.escape(SHARD_PREFIX)}[0-9a-f]{{12}}{re.escape(SHARD_SUFFIX)}$")
CODES_SUFFIX = ".npy"  # a level's field is "<level>.npy"
LABEL_FIELD = "cls"
KEY_INDEX_SUFFIX = ".keys.parquet"
WIDS_INDEX_NAME = "codes.wids.json"


class ShardEntry(ManifestModel):
    """One complete shard: ``samples`` stored in it, of which ``removed`` no longer belong to the
    corpus; ``class_counts`` counts the others (what readers yield) by label (empty for an
    unlabelled corpus)."""

    name: str
    uri: str
    samples: int
    bytes: int
    class_counts: dict[int, int] = {}
    removed: int = 0


class CodeShards(ManifestModel):
    """A set of code shards and what a reader needs to know to read them: the levels in order,
    each level's map shape and stored dtype, the fractions that split the keys, and the
    Parquet table (columns shard, key) of stored samples that readers must skip, if any.
    ``labelled`` false: the samples have no class (no ``.cls`` member); readers give label -1."""

    shards: list[ShardEntry]
    levels: list[str]
    code_shapes: dict[str, list[int]]  # level -> [h, w]
    code_dtypes: dict[str, str]  # level -> numpy dtype name
    validation_fraction: float
    test_fraction: float
    removed_table: str = ""
    labelled: bool = True

    def removed_keys(self) -> dict[str, frozenset[str]]:
        """shard name -> keys stored in it that readers skip (empty when nothing was removed)."""
        return read_removed(self.removed_table) if self.removed_table else {}


def check_shard_files(codes: CodeShards) -> None:
    """Every shard the set lists is where it was written, with the bytes it had then.

    Codes read from a shard that was replaced or cut short would train or score silently on the
    wrong data; a size check costs one listing per shard folder, so readers run it before they
    start. Raises MissingInputError or InputError naming the shard.
    """
    folders: dict[str, list[ShardEntry]] = {}
    for shard in codes.shards:
        folders.setdefault(shard.uri.rsplit("/", 1)[0], []).append(shard)
    for folder, shards in folders.items():
        sizes = storage.file_sizes(folder)
        for shard in shards:
            name = shard.uri.rsplit("/", 1)[-1]
            if name not in sizes:
                raise MissingInputError(
                    f"code shard {shard.uri} is missing, though its tokenize manifest lists it; "
                    "run tokenize again (vqpipe tokenize CONFIG --force)"
                )
            if sizes[name] != shard.bytes:
                raise InputError(
                    f"code shard {shard.uri} has {sizes[name]} bytes, but tokenize wrote "
                    f"{shard.bytes}: it changed after its manifest was written; restore it or run "
                    "tokenize again (vqpipe tokenize CONFIG --force)"
                )


def code_dtype(num_codes: int) -> np.dtype:
    """The smallest unsigned integer dtype holding codes 0..num_codes-1."""
    if num_codes <= 0:
        raise ValueError(f"a codebook needs at least one code, got {num_codes}")
    for dtype in (np.uint8, np.uint16, np.uint32):
        if num_codes - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"codebook of {num_codes} codes does not fit in uint32")


def shard_name(keys: Sequence[str]) -> str:
    """The content-derived name of a shard holding ``keys`` (in order)."""
    digest = hashlib.sha1("\n".join(keys).encode()).hexdigest()
    return f"{SHARD_PREFIX}{digest[:12]}{SHARD_SUFFIX}"


def is_shard(uri: str) -> bool:
    """Whether ``uri`` names a complete code shard (``codes-<hash>.tar``, not its key index nor a
    temporary file)."""
    return bool(SHARD_PATTERN.match(uri.rsplit("/", 1)[-1]))


def level_field(level: str) -> str:
    """The WebDataset field of a sample that holds a level's code map: ``top`` -> ``top.npy``."""
    return f"{level}{CODES_SUFFIX}"


def levels_of(fields: Iterable[str]) -> list[str]:
    """The levels whose code maps a sample (or batch) with these fields holds, sorted."""
    return sorted(f[: -len(CODES_SUFFIX)] for f in fields if f.endswith(CODES_SUFFIX))


def check_levels(found: Sequence[str], expected: Sequence[str], where: str, whose: str) -> None:
    """Raise InputError unless ``found``, the levels ``where`` holds, are the ``expected`` levels
    (in any order: a sample's fields have none), ``whose`` levels ("the autoencoder")."""
    if sorted(found) != sorted(expected):
        raise InputError(
            f"{where} holds the code levels {sorted(found)}, but {whose} has the levels "
            f"{list(expected)}: these shards were not written by that tokenizer"
        )


def read_code_map(data: bytes) -> np.ndarray:
    """A stored code map (the bytes of a ``<level>.npy`` member); numpy only, never pickle."""
    return np.lib.format.read_array(io.BytesIO(bytes(data)), allow_pickle=False)


def list_shards(directory: str) -> list[str]:
    """URIs of the complete shards in ``directory``, sorted by name."""
    return [uri for uri in storage.list_files(directory, recursive=False) if is_shard(uri)]


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444
    info.mtime = 0  # reproducible bytes: the same samples always make the same shard
    tar.addfile(info, io.BytesIO(data))


def shard_bytes(
    keys: Sequence[str], labels: Sequence[int] | None, codes: dict[str, np.ndarray]
) -> bytes:
    """A shard's tar bytes for ``keys`` with ``labels`` (None: unlabelled, no ``.cls`` members)
    and per-level code arrays (N x h x w)."""
    count = len(keys)
    if labels is not None and len(labels) != count:
        raise ValueError(f"got {count} keys but {len(labels)} labels")
    if not codes:
        raise ValueError("a shard needs at least one level of codes")
    for level, array in codes.items():
        if "." in level or not level:
            raise ValueError(
                f"level names become file suffixes and cannot contain '.'; got {level!r}"
            )
        if array.ndim != 3 or array.shape[0] != count:
            raise ValueError(
                f"codes for level {level!r} must be N x h x w with N = {count}, got {array.shape}"
            )
        if array.dtype.kind != "u":
            raise ValueError(
                f"codes for level {level!r} must be stored unsigned (see code_dtype), got {array.dtype}"
            )
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i, key in enumerate(keys):
            if "." in key.rsplit("/", 1)[-1]:
                raise ValueError(f"key {key!r} has a dot in its last component; see sanitize_key")
            # WebDataset groups a sample's members by adjacency: write them together.
            for level, array in codes.items():
                _add_member(tar, f"{key}.{level_field(level)}", _npy_bytes(array[i]))
            if labels is not None:
                _add_member(tar, f"{key}.{LABEL_FIELD}", str(int(labels[i])).encode())
    return buffer.getvalue()


def key_index_uri(shard_uri: str) -> str:
    """Where the key index of the shard at ``shard_uri`` lies."""
    if not shard_uri.endswith(SHARD_SUFFIX):
        raise ValueError(f"{shard_uri!r} is not a shard (expected codes-<hash>.tar)")
    return shard_uri[: -len(SHARD_SUFFIX)] + KEY_INDEX_SUFFIX


def is_key_index(uri: str) -> bool:
    return uri.endswith(KEY_INDEX_SUFFIX)


def shard_of_key_index(index_uri: str) -> str:
    return index_uri[: -len(KEY_INDEX_SUFFIX)] + SHARD_SUFFIX


def _parquet_bytes(table: Any) -> bytes:
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def key_index_bytes(
    keys: Sequence[str], labels: Sequence[int] | None, sources: Sequence[str]
) -> bytes:
    import pyarrow as pa

    stored = [None] * len(keys) if labels is None else [int(x) for x in labels]
    return _parquet_bytes(
        pa.table(
            {
                "key": pa.array(list(keys), pa.string()),
                "label": pa.array(stored, pa.int64()),
                "source": pa.array(list(sources), pa.string()),
            }
        )
    )


def read_key_index(shard_uri: str, columns: Sequence[str] | None = None) -> Any:
    """The key index of a shard as a pyarrow Table (key, label, source), in shard order."""
    import pyarrow.parquet as pq

    fs, path = storage.resolve(key_index_uri(shard_uri))
    with fs.open_input_file(path) as f:
        return pq.read_table(f, columns=list(columns) if columns is not None else None)


def write_shard(
    directory: str,
    keys: Sequence[str],
    labels: Sequence[int] | None,
    codes: dict[str, np.ndarray],
    sources: Sequence[str] | None = None,
) -> ShardEntry:
    """Write one shard and its key index atomically under ``directory``; returns its entry.

    ``labels`` None writes samples without a class (an unlabelled corpus); ``sources`` names the
    input each sample was made from (empty when unknown).
    """
    keys = [str(k) for k in keys]
    if sources is None:
        sources = [""] * len(keys)
    if len(sources) != len(keys):
        raise ValueError(f"got {len(keys)} keys but {len(sources)} sources")
    data = shard_bytes(keys, labels, codes)
    name = shard_name(keys)
    uri = storage.join(directory, name)
    # The index first: the shard's rename is the commit point, so a shard never lacks its index,
    # and an index without its shard is a leftover that a resumed run deletes.
    storage.write_bytes(key_index_uri(uri), key_index_bytes(keys, labels, sources))
    storage.write_bytes(uri, data)
    counts = Counter(int(x) for x in (() if labels is None else labels))
    return ShardEntry(
        name=name,
        uri=uri,
        samples=len(keys),
        bytes=len(data),
        class_counts=dict(sorted(counts.items())),
    )


def removed_table_bytes(rows: Iterable[tuple[str, str]]) -> bytes:
    """A Parquet table of (shard name, key) pairs, sorted, for ``CodeShards.removed_table``."""
    import pyarrow as pa

    ordered = sorted(rows)
    return _parquet_bytes(
        pa.table(
            {
                "shard": pa.array([r[0] for r in ordered], pa.string()),
                "key": pa.array([r[1] for r in ordered], pa.string()),
            }
        )
    )


def read_removed(uri: str) -> dict[str, frozenset[str]]:
    """shard name -> removed keys, from a table written with ``removed_table_bytes``."""
    import pyarrow.parquet as pq

    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        table = pq.read_table(f, columns=["shard", "key"])
    found: dict[str, set[str]] = {}
    for shard, key in zip(table.column("shard").to_pylist(), table.column("key").to_pylist()):
        found.setdefault(shard, set()).add(key)
    return {shard: frozenset(keys) for shard, keys in found.items()}


def write_wids_index(directory: str, shards: Sequence[ShardEntry]) -> str:
    """Write ``codes.wids.json`` for ``shards`` (name and stored sample count); returns its URI.

    URLs are the shard names: ``wids`` resolves them against the index's own location, so the
    stage directory can be moved or copied to an object store whole.
    """
    document = {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": "vqpipe code shards",
        "shardlist": [
            {"url": s.name, "nsamples": int(s.samples), "filesize": int(s.bytes)}
            for s in sorted(shards, key=lambda s: s.name)
        ],
    }
    uri = storage.join(directory, WIDS_INDEX_NAME)
    storage.write_bytes(uri, json.dumps(document, indent=1).encode())
    return uri


def _split_member(member_name: str) -> tuple[str, str] | None:
    """(key, field) of a tar member, split as WebDataset does at the first dot of the last
    component: ``circle/00012.top.npy`` -> (``circle/00012``, ``top.npy``); None without one."""
    head, _, last = member_name.rpartition("/")
    stem, dot, field = last.partition(".")
    if not dot or not stem:
        return None
    return (f"{head}/{stem}" if head else stem), field


def _iter_members(uri: str) -> Iterator[tuple[str, str, tarfile.TarFile, tarfile.TarInfo]]:
    """(key, field, tar, member) of every sample member of a tar, in stored order, streamed."""
    fs, path = storage.resolve(uri)
    with fs.open_input_stream(path) as stream:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                split = _split_member(member.name) if member.isreg() else None
                if split is not None:
                    yield split[0], split[1], tar, member


def read_shard_keys(uri: str) -> list[str]:
    """The keys of the samples in a shard, in order (what a resumed run must not write again)."""
    keys: list[str] = []
    for key, _, _, _ in _iter_members(uri):
        if not keys or keys[-1] != key:
            keys.append(key)
    return keys


def read_first_sample(uri: str) -> tuple[str, dict[str, bytes]] | None:
    """The key and raw fields ("top.npy", "cls", ...) of the first sample of a WebDataset tar,
    reading no further; None when it holds no samples. Labels are not required, so shards
    written by other tools can be inspected too."""
    first, fields = None, {}
    with closing(_iter_members(uri)) as members:
        for key, field, tar, member in members:
            if first is None:
                first = key
            if key != first:
                break
            fields[field] = tar.extractfile(member).read()
    return None if first is None else (first, fields)


def sample_codes(fields: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """level -> code map of every ``<level>.npy`` field of one raw sample."""
    return {level: read_code_map(fields[level_field(level)]) for level in levels_of(fields)}


def batch_keys(batch: Mapping[str, Any]) -> list[str]:
    """The sample keys of a batch of ``read_raw_shards`` as strings."""
    return [k if isinstance(k, str) else bytes(k).decode() for k in batch["__key__"]]


def batch_codes(batch: Mapping[str, Any], levels: Sequence[str]) -> dict[str, np.ndarray]:
    """level -> N x h x w stored codes, for those of ``levels`` a batch of ``read_raw_shards``
    holds (a caller that needs them all checks what is missing)."""
    return {
        level: np.stack([read_code_map(b) for b in batch[level_field(level)]])
        for level in levels
        if level_field(level) in batch
    }


def read_raw_shards(uris: Sequence[str], *, include_paths: bool = False):
    """WebDataset shards as a streaming ray.data.Dataset of undecoded samples: ``__key__`` and
    one bytes column per field ("top.npy", "cls", ...), and ``path`` (the shard) if asked for.

    Any WebDataset tars, code shards or not; ``code_dataset`` decodes code shards with labels
    and splits, ``batch_keys`` and ``batch_codes`` the fields of other ones.
    """
    import ray

    fs, _ = storage.resolve(uris[0])
    return ray.data.read_webdataset(
        [storage.resolve(u)[1] for u in uris],
        filesystem=fs,
        decoder=None,
        include_paths=include_paths,
    )


# -------------------------------------------------------------------------------------------------
# Readers


def _decode_sample(
    sample: dict[str, Any], levels: Sequence[str] | None, labelled: bool
) -> dict[str, Any]:
    """Raw WebDataset fields -> {key, label, <level>: array}; numpy only, never pickle. Unlabelled
    samples (``labelled`` false) get label -1."""
    out: dict[str, Any] = {"key": sample["__key__"], "label": -1}
    label = sample.get(LABEL_FIELD)
    if labelled and label is None:
        raise ValueError(f"sample {sample['__key__']!r} in {sample.get('__url__')} has no .cls")
    if labelled:
        out["label"] = int(bytes(label).decode())
    found = levels_of(sample)
    if levels is not None:
        where = f"sample {sample['__key__']!r} in {sample.get('__url__')}"
        check_levels(found, levels, where, "its set of code shards (its tokenizer)")
    for level in levels if levels is not None else found:
        out[level] = read_code_map(sample[level_field(level)])
    return out


def iter_code_samples(
    shard_uris: Iterable[str],
    levels: Sequence[str] | None = None,
    *,
    removed: Mapping[str, frozenset[str]] | None = None,
    labelled: bool = True,
) -> Iterator[dict[str, Any]]:
    """Samples of shards in order, as {key, label, <level>: h x w array in the stored dtype}.
    With ``levels``, a sample holding other levels than those is refused (InputError). The shards
    of an unlabelled corpus (``labelled`` false) give label -1; labelled ones need a ``.cls``.

    A plain WebDataset reading loop with streams opened through pyarrow, so local paths and
    object-store URLs work alike; fields are decoded with numpy (allow_pickle=False) and int().
    ``removed`` (shard name -> keys, ``CodeShards.removed_keys()``) are skipped; reading a
    manifest's shards, use ``iter_manifest_samples`` which passes them.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander

    def streams() -> Iterator[dict[str, Any]]:
        for uri in shard_uris:
            fs, path = storage.resolve(uri)
            with fs.open_input_stream(path) as stream:
                yield {"url": uri, "stream": stream}

    for sample in group_by_keys(tar_file_expander(streams())):
        if removed:
            skip = removed.get(str(sample["__url__"]).rsplit("/", 1)[-1])
            if skip and sample["__key__"] in skip:
                continue
        yield _decode_sample(sample, levels, labelled)


def iter_manifest_samples(
    codes: CodeShards, levels: Sequence[str] | None = None
) -> Iterator[dict[str, Any]]:
    """The live samples of a set of code shards (a tokenize manifest), removed ones skipped;
    every sample must hold the set's levels (``levels``, default: all of them)."""
    check_shard_files(codes)
    yield from iter_code_samples(
        [shard.uri for shard in codes.shards],
        list(codes.levels) if levels is None else levels,
        removed=codes.removed_keys(),
        labelled=codes.labelled,
    )


def _decode_code_batch(
    batch: dict[str, np.ndarray],
    levels: list[str],
    shapes: dict[str, list[int]],
    dtypes: dict[str, str],
    fractions: tuple[float, float],
    split: str,
    as_int64: bool,
    removed: Mapping[str, frozenset[str]] | None = None,
    labelled: bool = True,
) -> dict[str, np.ndarray]:
    keys = [str(k) for k in batch["__key__"]]
    if keys:
        where = f"samples {keys[0]!r}..{keys[-1]!r}"
        check_levels(levels_of(batch), levels, where, "their set of code shards (its tokenizer)")
    wanted = np.flatnonzero(split_mask(unit_hashes(keys), split, *fractions)).tolist()
    if removed:
        shards = [str(p).rsplit("/", 1)[-1] for p in batch["path"]]
        wanted = [i for i in wanted if keys[i] not in removed.get(shards[i], ())]
    out: dict[str, np.ndarray] = {
        "key": np.array([keys[i] for i in wanted], dtype=object),
        "label": np.array(
            [int(bytes(batch[LABEL_FIELD][i]).decode()) for i in wanted]
            if labelled
            else [-1] * len(wanted),
            dtype=np.int64,
        ),
    }
    for level in levels:
        arrays = [read_code_map(batch[level_field(level)][i]) for i in wanted]
        stacked = (
            np.stack(arrays)
            if arrays
            else np.zeros((0, *shapes[level]), dtype=np.dtype(dtypes[level]))
        )
        out[level] = stacked.astype(np.int64) if as_int64 else stacked
    return out


def relabel_codes(
    batch: dict[str, np.ndarray], labels: np.ndarray, prefix: str | None = None
) -> dict[str, np.ndarray]:
    """A batch of ``code_dataset`` with each label replaced by ``labels[label]`` and, given a
    prefix, keys ``<prefix>/<key>``: one corpus' samples in a union of corpora."""
    out = dict(batch)
    if prefix is not None:
        out["key"] = np.array([f"{prefix}/{k}" for k in batch["key"]], dtype=object)
    if len(labels):
        out["label"] = labels[np.asarray(batch["label"], dtype=np.int64)]
    return out


def code_dataset(codes: CodeShards, split: str = "train", *, as_int64: bool = True):
    """Code shards (a tokenize manifest, say) as a streaming ray.data.Dataset.

    Columns: key (str), label (int64; -1 for an unlabelled corpus) and one h x w array column per
    level. Codes come as int64
    (``as_int64``), what embedding layers index with; ``as_int64=False`` keeps the stored dtype.
    ``split`` is "train", "validation", "test" or "all". Samples the set lists as removed are
    skipped.

    For metrics, not training: training reads shards through ``pipelines.data.epochs.EpochReader``,
    whose order does not depend on scheduling.
    """
    if split not in (*SPLITS, "all"):
        raise ValueError(f"split must be one of {(*SPLITS, 'all')}, got {split!r}")
    uris = [shard.uri for shard in codes.shards]
    if not uris:
        raise ValueError("the tokenize manifest lists no shards (was the corpus empty?)")
    check_shard_files(codes)
    removed = codes.removed_keys()
    # The shard a sample came from, to skip removed ones: their keys are per shard, since an
    # image removed and later added back under the same key lives on in a new shard.
    ds = read_raw_shards(uris, include_paths=bool(removed))
    return ds.map_batches(
        _decode_code_batch,
        batch_format="numpy",
        fn_kwargs={
            "levels": list(codes.levels),
            "shapes": dict(codes.code_shapes),
            "dtypes": dict(codes.code_dtypes),
            "fractions": (codes.validation_fraction, codes.test_fraction),
            "split": split,
            "as_int64": as_int64,
            "removed": removed,
            "labelled": codes.labelled,
        },
    )
