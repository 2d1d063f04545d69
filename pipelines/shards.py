"""The code-shard format: how tokenized images are stored, written and read back.

A shard is a plain POSIX tar file named ``codes-<12 hex digits>.tar`` that WebDataset reads as is.
Each sample is one input image:

    <key>.<level>.npy   one per level ("top.npy" and "bottom.npy" for VQ-VAE-2, "codes.npy" for a
                        one-level model): an h x w array in the smallest unsigned dtype that holds
                        the level's codebook (uint8 for K <= 256, uint16 for K <= 65536, else uint32)
    <key>.cls           the integer class label as ASCII digits

Keys are the corpus keys (``pipelines.keys``): "/"-separated, no dot in the last component, so a
WebDataset reader splits ``circle/00012.top.npy`` into key ``circle/00012`` and field ``top.npy``.
The sample's split is not stored: it is ``pipelines.keys.split_of(key, validation_fraction,
test_fraction)``, the same function that split the images, with the fractions recorded in the
tokenize manifest.

A shard's name is a hash of the keys it holds. Writing is atomic (temporary name, then rename), so a
name that exists is a complete shard; and a writer that is retried after a crash rewrites the same
name instead of adding a duplicate. Tar headers carry no timestamps or owners, so a shard's bytes
depend only on its samples.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from pipelines import storage
from pipelines.keys import SPLITS, split_mask, unit_hashes
from pipelines.manifest import ManifestModel

SHARD_PATTERN = re.compile(r"^codes-[0-9a-f]{12}\.tar$")
LABEL_FIELD = "cls"


class ShardEntry(ManifestModel):
    """One complete shard."""

    name: str
    uri: str
    samples: int
    bytes: int


class CodeShards(ManifestModel):
    """A set of code shards and what a reader needs to know to read them: the levels in order,
    each level's map shape and stored dtype, and the fractions that split the keys."""

    shards: list[ShardEntry]
    levels: list[str]
    code_shapes: dict[str, list[int]]  # level -> [h, w]
    code_dtypes: dict[str, str]  # level -> numpy dtype name
    validation_fraction: float
    test_fraction: float


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
    return f"codes-{digest[:12]}.tar"


def is_shard(uri: str) -> bool:
    return bool(SHARD_PATTERN.match(uri.rsplit("/", 1)[-1]))


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


def shard_bytes(keys: Sequence[str], labels: Sequence[int], codes: dict[str, np.ndarray]) -> bytes:
    """A shard's tar bytes for ``keys`` with ``labels`` and per-level code arrays (N x h x w)."""
    count = len(keys)
    if len(labels) != count:
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
                _add_member(tar, f"{key}.{level}.npy", _npy_bytes(array[i]))
            _add_member(tar, f"{key}.{LABEL_FIELD}", str(int(labels[i])).encode())
    return buffer.getvalue()


def write_shard(
    directory: str, keys: Sequence[str], labels: Sequence[int], codes: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Write one shard atomically under ``directory``; returns {name, uri, samples, bytes}."""
    keys = [str(k) for k in keys]
    data = shard_bytes(keys, labels, codes)
    name = shard_name(keys)
    uri = storage.join(directory, name)
    storage.write_bytes(uri, data)
    return {"name": name, "uri": uri, "samples": len(keys), "bytes": len(data)}


def _key_of(member_name: str) -> str | None:
    head, _, last = member_name.rpartition("/")
    stem, dot, _ = last.partition(".")
    if not dot or not stem:
        return None
    return f"{head}/{stem}" if head else stem


def read_shard_keys(uri: str) -> list[str]:
    """The keys of the samples in a shard, in order (what a resumed run must not write again)."""
    fs, path = storage.resolve(uri)
    keys: list[str] = []
    with fs.open_input_stream(path) as stream:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                key = _key_of(member.name) if member.isreg() else None
                if key is not None and (not keys or keys[-1] != key):
                    keys.append(key)
    return keys


# -------------------------------------------------------------------------------------------------
# Readers


def _decode_sample(sample: dict[str, Any], levels: Sequence[str] | None) -> dict[str, Any]:
    """Raw WebDataset fields -> {key, label, <level>: array}; numpy only, never pickle."""
    out: dict[str, Any] = {"key": sample["__key__"]}
    label = sample.get(LABEL_FIELD)
    if label is None:
        raise ValueError(f"sample {sample['__key__']!r} in {sample.get('__url__')} has no .cls")
    out["label"] = int(bytes(label).decode())
    found = sorted(f[: -len(".npy")] for f in sample if f.endswith(".npy"))
    for level in levels if levels is not None else found:
        field = f"{level}.npy"
        if field not in sample:
            raise ValueError(
                f"sample {sample['__key__']!r} in {sample.get('__url__')} has no {field}; it has "
                f"levels {found}"
            )
        out[level] = np.lib.format.read_array(io.BytesIO(sample[field]), allow_pickle=False)
    return out


def iter_code_samples(
    shard_uris: Iterable[str], levels: Sequence[str] | None = None
) -> Iterator[dict[str, Any]]:
    """Samples of shards in order, as {key, label, <level>: h x w array in the stored dtype}.

    A plain WebDataset reading loop with streams opened through pyarrow, so local paths and
    object-store URLs work alike; fields are decoded with numpy (allow_pickle=False) and int().
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander

    def streams() -> Iterator[dict[str, Any]]:
        for uri in shard_uris:
            fs, path = storage.resolve(uri)
            with fs.open_input_stream(path) as stream:
                yield {"url": uri, "stream": stream}

    for sample in group_by_keys(tar_file_expander(streams())):
        yield _decode_sample(sample, levels)


def _decode_code_batch(
    batch: dict[str, np.ndarray],
    levels: list[str],
    shapes: dict[str, list[int]],
    dtypes: dict[str, str],
    fractions: tuple[float, float],
    split: str,
    as_int64: bool,
) -> dict[str, np.ndarray]:
    keys = [str(k) for k in batch["__key__"]]
    wanted = np.flatnonzero(split_mask(unit_hashes(keys), split, *fractions)).tolist()
    out: dict[str, np.ndarray] = {
        "key": np.array([keys[i] for i in wanted], dtype=object),
        "label": np.array(
            [int(bytes(batch[LABEL_FIELD][i]).decode()) for i in wanted], dtype=np.int64
        ),
    }
    for level in levels:
        arrays = [
            np.lib.format.read_array(io.BytesIO(batch[f"{level}.npy"][i]), allow_pickle=False)
            for i in wanted
        ]
        stacked = (
            np.stack(arrays)
            if arrays
            else np.zeros((0, *shapes[level]), dtype=np.dtype(dtypes[level]))
        )
        out[level] = stacked.astype(np.int64) if as_int64 else stacked
    return out


def code_dataset(codes: CodeShards, split: str = "train", *, as_int64: bool = True):
    """Code shards (a tokenize manifest, say) as a streaming ray.data.Dataset.

    Columns: key (str), label (int64) and one h x w array column per level. Codes come as int64
    (``as_int64``), what embedding layers index with; ``as_int64=False`` keeps the stored dtype.
    ``split`` is "train", "validation", "test" or "all".

    For metrics, not training: training reads shards through ``pipelines.epochs.EpochReader``,
    whose order does not depend on scheduling.
    """
    import ray

    if split not in (*SPLITS, "all"):
        raise ValueError(f"split must be one of {(*SPLITS, 'all')}, got {split!r}")
    uris = [shard.uri for shard in codes.shards]
    if not uris:
        raise ValueError("the tokenize manifest lists no shards (was the corpus empty?)")
    fs, _ = storage.resolve(uris[0])
    ds = ray.data.read_webdataset(
        [storage.resolve(u)[1] for u in uris], filesystem=fs, decoder=None
    )
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
        },
    )
