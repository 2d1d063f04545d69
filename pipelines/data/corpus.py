"""Corpus readers: an image corpus as a streaming Ray Dataset of fixed-size uint8 images.

Three layouts are read, local or in an object store (anything pyarrow.fs opens):

- ``folder``: ``root/<class_name>/**/*.{png,jpg,jpeg,bmp,webp,gif}``; classes are the sorted
  subfolder names (hidden ones, starting with "." or "_", are skipped, as are such files). A flat
  folder, ``root/*.png`` with no (visible) subfolder, is an unlabelled corpus.
- ``webdataset``: ``.tar`` shards (a file, a folder of them, or a brace pattern such as
  ``shards-{000..099}.tar``); a sample is an image member (``.jpg``, ``.png``, ...) and a ``.cls``
  member holding the integer label (shards without any ``.cls`` member: an unlabelled corpus).
- ``parquet``: a file or folder of Parquet files with an image column (encoded bytes, or a struct
  with a ``bytes`` field as Hugging Face datasets write it), an integer label column (none: an
  unlabelled corpus) and optionally a key column.

``format: auto`` picks the layout from what the source contains (a ``.tar``/``.parquet`` file or
pattern, a folder holding such files, or else class subfolders or images).

Labels (``data.labels``): with ``auto`` a corpus is unlabelled when it has no labels at all as
above; ``required`` refuses such a corpus; ``none`` ignores the labels of any corpus. An unlabelled
corpus has no class names (``Corpus.labelled`` is false) and every row's label is -1. A folder
whose top level mixes images with subfolders is refused under ``auto`` and ``required`` (which
would the images at the top be?); under ``none`` every image below the root is read.

Every row gets a key that is stable for as long as the source is: the path relative to the root
without its extension (folder), the sample's ``__key__`` (webdataset), the key column or
``<file>/<row index>`` (parquet). Keys are made safe for WebDataset (no dot in the last path
component, see ``sanitize_key``). Two files that differ only by extension (``a.png``, ``a.jpg``)
share a key; keep one per name.

The split of a row (train, validation or test) is a hash of its key (``split_of``), so adding
images never moves old ones between splits. Decoding follows the rules of ``pipelines.data.images.decode_image``.

Bad inputs (empty, truncated or undecodable files, samples without an image or label) are dropped
from the stream and logged with ``data.on_bad_input: skip``; ``Corpus.dataset(keep_errors=True)``
keeps them as rows with a non-empty ``error`` (and a ``source``) so a stage can count and report
them. With ``on_bad_input: fail`` the first one raises BadInputError naming the file and the reason.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.config import DataSection
from pipelines.data import storage
from pipelines.data.images import BadImageError, decode_image
from pipelines.data.keys import SPLITS as KEY_SPLITS
from pipelines.data.keys import in_key_set, key_hash, key_hashes, sanitize_key, split_of
from pipelines.errors import BadInputError, InputError, MissingInputError

log = logging.getLogger("vqpipe")

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "webp", "gif")
# WebDataset shards commonly also use the netpbm and TIFF suffixes.
WDS_IMAGE_EXTENSIONS = (*IMAGE_EXTENSIONS, "ppm", "pgm", "pbm", "pnm", "tif", "tiff")
SPLITS = (*KEY_SPLITS, "all")
# Images decoded per call: large enough to amortise Python overhead, small enough that a batch of
# 256x256 RGB images (12 MiB at 64) stays well below Ray's block size target.
DECODE_BATCH = 64
# Image files per work unit of a folder corpus (see Corpus.units).
FOLDER_UNIT_FILES = 256


# -------------------------------------------------------------------------------------------------
# Format detection and listing


def _expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> [a-000.tar, a-001.tar, a-002.tar]; also ``{x,y}`` alternatives."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end() :]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        options = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [x for option in options for x in _expand_braces(head + option + tail)]


def _files_with_suffix(source: str, suffix: str) -> list[str]:
    """URIs of the ``suffix`` files that ``source`` names: a file, a brace pattern or a folder."""
    if "{" in source:
        return _expand_braces(source)
    if source.lower().endswith(suffix):
        return [source]
    return [
        uri
        for uri in storage.list_files(source)
        if uri.lower().endswith(suffix) and not os.path.basename(uri).startswith((".", "_"))
    ]


def _class_dirs(source: str) -> list[str]:
    return [d for d in storage.list_dirs(source) if not d.startswith((".", "_"))]


def _top_level_images(source: str) -> list[str]:
    """The image files directly in the folder ``source`` (hidden ones skipped)."""
    found = []
    for uri in storage.list_files(source, recursive=False):
        name = os.path.basename(uri)
        ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
        if ext in IMAGE_EXTENSIONS and not name.startswith((".", "_")):
            found.append(uri)
    return found


def detect_format(source: str) -> str:
    """ "folder", "webdataset" or "parquet" from what ``source`` holds."""
    lowered = source.lower()
    if lowered.endswith(".tar") or ("{" in source and ".tar" in lowered):
        return "webdataset"
    if lowered.endswith(".parquet"):
        return "parquet"
    if not storage.exists(source):
        raise MissingInputError(f"data.source {source!r} does not exist")
    if not storage.is_dir(source):
        raise InputError(
            f"data.source {source!r} is a file but neither .tar nor .parquet; expected a folder of "
            "class subfolders, .tar shards or Parquet files"
        )
    names = [os.path.basename(u).lower() for u in storage.list_files(source, recursive=False)]
    if any(n.endswith(".tar") for n in names):
        return "webdataset"
    if any(n.endswith(".parquet") for n in names):
        return "parquet"
    if _class_dirs(source) or _top_level_images(source):
        return "folder"
    raise InputError(
        f"cannot tell the format of {source!r}: it holds no .tar or .parquet files, no class "
        "subfolders and no images; set data.format or point data.source at the corpus"
    )


def _fs_path(uri: str) -> str:
    return storage.resolve(uri)[1]


# -------------------------------------------------------------------------------------------------
# Per-format extraction: raw Ray rows -> key, label, payload (encoded image), source, error


@dataclass(frozen=True)
class _ReadSpec:
    """Everything a reader task needs; small and picklable."""

    format: str
    root_path: str
    class_index: dict[str, int]
    num_classes: int
    size_hw: tuple[int, int]
    channels: int
    validation_fraction: float
    test_fraction: float
    split: str
    keep_errors: bool
    on_bad_input: str
    labelled: bool  # False: every row's label is -1 and none is read or checked
    label_column: str
    image_column: str
    key_column: str | None
    skip_ref: Any = None  # ObjectRef of a sorted uint64 array (key_hashes) or None
    keep_payload: bool = False  # also return each row's encoded file ("payload")


def _as_bytes(value: Any) -> bytes | None:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:
        return value.tobytes()
    if isinstance(value, dict):  # Hugging Face image struct: {"bytes": ..., "path": ...}
        return _as_bytes(value.get("bytes"))
    return None


def _extract_folder(batch: dict, spec: _ReadSpec) -> dict[str, list]:
    out: dict[str, list] = {"key": [], "label": [], "payload": [], "source": [], "error": []}
    for path, data in zip(batch["path"], batch["bytes"]):
        path = str(path)
        rel = path[len(spec.root_path) :].lstrip("/")
        class_name = rel.split("/", 1)[0]
        stem, _ = os.path.splitext(rel)
        out["key"].append(sanitize_key(stem))
        out["payload"].append(_as_bytes(data))
        out["source"].append(path)
        if not spec.labelled:
            out["label"].append(-1)
            out["error"].append("")
            continue
        out["label"].append(spec.class_index.get(class_name, -1))
        out["error"].append("" if class_name in spec.class_index else "not in a class folder")
    return out


def _extract_webdataset(batch: dict, spec: _ReadSpec) -> dict[str, list]:
    out: dict[str, list] = {"key": [], "label": [], "payload": [], "source": [], "error": []}
    n = len(batch["__key__"])
    images = batch.get("image", [None] * n)
    labels = batch.get("cls", [None] * n)
    urls = batch.get("__url__", [""] * n)
    for raw_key, url, image, cls in zip(batch["__key__"], urls, images, labels):
        error, label = "", -1
        cls_bytes = _as_bytes(cls)
        if not spec.labelled:
            pass  # labels, if any, are ignored
        elif cls_bytes is None:
            error = "no .cls member (integer label)"
        else:
            try:
                label = int(cls_bytes.decode().strip())
            except (UnicodeDecodeError, ValueError):
                error = f".cls member is not an integer: {cls_bytes[:20]!r}"
        payload = _as_bytes(image)
        if payload is None and not error:
            error = f"no image member ({', '.join('.' + e for e in WDS_IMAGE_EXTENSIONS)})"
        out["key"].append(sanitize_key(str(raw_key)))
        out["label"].append(label)
        out["payload"].append(payload)
        out["source"].append(f"{url}:{raw_key}")
        out["error"].append(error)
    return out


def _extract_parquet(batch: dict, spec: _ReadSpec) -> dict[str, list]:
    # The row-group reader already produced the common columns.
    return {name: list(batch[name]) for name in ("key", "label", "payload", "source", "error")}


_EXTRACTORS = {
    "folder": _extract_folder,
    "webdataset": _extract_webdataset,
    "parquet": _extract_parquet,
}

_SKIP_CACHE: dict[str, np.ndarray] = {}


def _skip_hashes(spec: _ReadSpec) -> np.ndarray | None:
    if spec.skip_ref is None:
        return None
    import ray

    cache_key = spec.skip_ref.hex()
    if cache_key not in _SKIP_CACHE:
        _SKIP_CACHE.clear()  # one resume set at a time per worker process
        _SKIP_CACHE[cache_key] = ray.get(spec.skip_ref)
    return _SKIP_CACHE[cache_key]


def _decode_batch(batch: dict, spec: _ReadSpec) -> dict[str, np.ndarray]:
    """Raw rows of one format -> key, image, label, split (+ error, source) for ``spec.split``."""
    rows = _EXTRACTORS[spec.format](batch, spec)
    keys = rows["key"]
    splits = [split_of(k, spec.validation_fraction, spec.test_fraction) for k in keys]
    wanted = np.array([spec.split in ("all", s) for s in splits], dtype=bool)
    skip = _skip_hashes(spec)
    if skip is not None:
        # Rows finished by an earlier run are dropped before the costly decode.
        wanted &= ~in_key_set(skip, keys)

    height, width = spec.size_hw
    images, out_keys, labels, out_splits, errors, sources, payloads = [], [], [], [], [], [], []
    for i in np.flatnonzero(wanted):
        error = rows["error"][i]
        label = int(rows["label"][i])
        image = None
        if not error and spec.labelled and not 0 <= label < spec.num_classes:
            error = f"label {label} is outside 0..{spec.num_classes - 1}"
        if not error:
            payload = rows["payload"][i]
            try:
                image = decode_image(payload or b"", spec.size_hw, spec.channels)
            except BadImageError as err:
                error = str(err)
        if error:
            source = rows["source"][i]
            if spec.on_bad_input == "fail":
                raise BadInputError(
                    f"{source}: {error} (data.on_bad_input is 'fail'; set it to 'skip' to drop "
                    "such inputs and report them)"
                )
            log.warning("skipping bad input %s (key %s): %s", source, keys[i], error)
            if not spec.keep_errors:
                continue
            image = np.zeros((height, width, spec.channels), dtype=np.uint8)
        images.append(image)
        out_keys.append(keys[i])
        labels.append(label)
        out_splits.append(splits[i])
        errors.append(error)
        sources.append(rows["source"][i])
        payloads.append(b"" if error else rows["payload"][i])

    if not images:
        return _empty_batch(spec)
    out = {
        "key": np.array(out_keys, dtype=object),
        "image": np.stack(images),
        "label": np.array(labels, dtype=np.int64),
        "split": np.array(out_splits, dtype=object),
    }
    if spec.keep_errors:
        out["error"] = np.array(errors, dtype=object)
        out["source"] = np.array(sources, dtype=object)
    if spec.keep_payload:
        out["payload"] = np.array(payloads + [None], dtype=object)[:-1]  # a 1-D array of bytes
    return out


def _empty_batch(spec: _ReadSpec):
    """A zero-row batch with the same column types as a full one.

    Ray Data cannot type a zero-length numpy image column and falls back to pickling it (with a
    warning); a typed empty Arrow table keeps every block's schema the same.
    """
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorType

    height, width = spec.size_hw
    columns = {
        "key": pa.array([], pa.string()),
        "image": pa.array([], ArrowTensorType((height, width, spec.channels), pa.uint8())),
        "label": pa.array([], pa.int64()),
        "split": pa.array([], pa.string()),
    }
    if spec.keep_errors:
        columns["error"] = pa.array([], pa.string())
        columns["source"] = pa.array([], pa.string())
    return pa.table(columns)


# -------------------------------------------------------------------------------------------------
# WebDataset member selection and Parquet row groups


def _wds_rename(fname: str) -> str:
    # Any single image suffix becomes "image", so every sample has the same columns whatever
    # its image format (a mix of .jpg and .png shards would otherwise give mismatched blocks).
    base, dot, ext = fname.rpartition("/")[2].partition(".")
    if dot and ext.lower() in WDS_IMAGE_EXTENSIONS:
        return fname[: len(fname) - len(ext)] + "image"
    return fname


def _wds_select(fname: str) -> bool:
    return fname.endswith(".image") or fname.endswith(".cls")


def _wds_select_labels(fname: str) -> bool:
    return fname.endswith(".cls")


def _parquet_row_groups(files: list[str], columns: list[str]) -> list[dict[str, Any]]:
    """One work item per row group, with the index of its first row in the file."""
    import pyarrow.parquet as pq

    items = []
    for uri in files:
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
            names = set(meta.schema.to_arrow_schema().names)
        missing = [c for c in columns if c not in names]
        if missing:
            raise InputError(
                f"{uri} lacks the column(s) {missing} named by data.image_column/label_column/"
                f"key_column; its columns are {sorted(names)}"
            )
        first = 0
        for group in range(meta.num_row_groups):
            items.append({"uri": uri, "row_group": group, "first_row": first})
            first += meta.row_group(group).num_rows
    return items


def _read_row_groups(items: dict, root: str, spec: _ReadSpec):
    """Read Parquet row groups into the common columns (key, label, payload, source, error)."""
    import pyarrow.parquet as pq

    for uri, group, first in zip(items["uri"], items["row_group"], items["first_row"]):
        uri = str(uri)
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            table = pq.ParquetFile(f).read_row_group(int(group), columns=_parquet_columns(spec))
        yield _row_group_columns(table, uri, int(first), root, spec)


def _parquet_columns(spec: _ReadSpec) -> list[str]:
    return _columns_read(
        spec.image_column, spec.label_column if spec.labelled else None, spec.key_column
    )


def _columns_read(image: str, label: str | None, key: str | None) -> list[str]:
    """The Parquet columns a reader takes: the image, the label (unless unlabelled), the key."""
    return [image] + ([label] if label else []) + ([key] if key else [])


def _row_group_columns(table, uri: str, first: int, root: str, spec: _ReadSpec) -> dict:
    """Rows of a Parquet file, the first of them its row ``first``, in the common columns."""
    inside = root and uri != root and uri.startswith(root)
    rel = uri[len(root) :].lstrip("/") if inside else os.path.basename(uri)
    stem = os.path.splitext(rel)[0]
    n = table.num_rows
    if spec.key_column:
        raw_keys = [str(k) for k in table.column(spec.key_column).to_pylist()]
    else:
        raw_keys = [f"{stem}/{first + i:08d}" for i in range(n)]
    labels, errors = [], []
    values = table.column(spec.label_column).to_pylist() if spec.labelled else [-1] * n
    for value in values:
        if value is None:
            labels.append(-1)
            errors.append(f"missing label in column {spec.label_column!r}")
        else:
            labels.append(int(value))
            errors.append("")
    payloads = [_as_bytes(v) for v in table.column(spec.image_column).to_pylist()]
    for i, payload in enumerate(payloads):
        if payload is None and not errors[i]:
            errors[i] = f"no image bytes in column {spec.image_column!r}"
    return {
        "key": np.array([sanitize_key(k) for k in raw_keys], dtype=object),
        "label": np.array(labels, dtype=np.int64),
        "payload": np.array([p or b"" for p in payloads], dtype=object),
        "source": np.array([f"{uri}#row={first + i}" for i in range(n)], dtype=object),
        "error": np.array(errors, dtype=object),
    }


# -------------------------------------------------------------------------------------------------
# Class-mixed reading of corpora stored class by class (tokenize)

INTERLEAVE_CHUNK = 8  # rows taken from one unit before moving to the next of its group


def _wds_chunks(uri: str) -> Iterator[dict[str, list]]:
    """One WebDataset shard streamed as raw columns (see ``_read_wds_shard``), a few samples at
    a time: only the current chunk's samples are in memory."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    fs, path = storage.resolve(uri)
    chunk: dict[str, list] = {"__key__": [], "__url__": [], "image": [], "cls": []}
    with fs.open_input_stream(path) as stream:
        for sample in group_by_keys(tar_file_expander([{"url": uri, "stream": stream}])):
            image = cls = None
            for field, value in sample.items():
                if field.lower() in WDS_IMAGE_EXTENSIONS:
                    image = value
                elif field == "cls":
                    cls = value
            chunk["__key__"].append(sample["__key__"])
            chunk["__url__"].append(uri)
            chunk["image"].append(image)
            chunk["cls"].append(cls)
            if len(chunk["__key__"]) == INTERLEAVE_CHUNK:
                yield chunk
                chunk = {name: [] for name in chunk}
    if chunk["__key__"]:
        yield chunk


def _parquet_chunks(unit: dict[str, Any], root: str, spec: _ReadSpec) -> Iterator[dict[str, list]]:
    """One Parquet row group streamed in the common columns, a few rows at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    uri, first = str(unit["uri"]), int(unit["first_row"])
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        batches = pq.ParquetFile(f).iter_batches(
            batch_size=INTERLEAVE_CHUNK,
            row_groups=[int(unit["row_group"])],
            columns=_parquet_columns(spec),
        )
        for batch in batches:
            rows = _row_group_columns(pa.Table.from_batches([batch]), uri, first, root, spec)
            first += batch.num_rows
            yield {name: list(values) for name, values in rows.items()}


def _interleave_units(items: dict, corpus_format: str, root: str, spec: _ReadSpec):
    """Ray Data generator UDF. Each input row names a group of work units (JSON); the group's
    rows come out alternating between its units, ``INTERLEAVE_CHUNK`` rows at a time, in raw
    batches of about ``DECODE_BATCH`` rows. Units are streamed: memory holds one chunk per unit
    of the group. A corpus stored class by class (one class per shard or file) thus gives a
    stream in which every run of rows mixes the classes of the group's units."""
    import json

    for group in items["group"]:
        units = json.loads(str(group))
        if corpus_format == "webdataset":
            streams = [_wds_chunks(u["uri"]) for u in units]
        else:
            streams = [_parquet_chunks(u, root, spec) for u in units]
        out: dict[str, list] = {}
        while streams:
            alive = []
            for stream in streams:
                chunk = next(stream, None)
                if chunk is None:
                    continue
                alive.append(stream)
                for name, values in chunk.items():
                    out.setdefault(name, []).extend(values)
            streams = alive
            if out and len(next(iter(out.values()))) >= DECODE_BATCH:
                yield _object_columns(out)
                out = {}
        if out and len(next(iter(out.values()))):
            yield _object_columns(out)


def _object_columns(columns: dict[str, list]) -> dict[str, np.ndarray]:
    out = {}
    for name, values in columns.items():
        array = np.empty(len(values), dtype=object)
        array[:] = values
        out[name] = array
    return out


# -------------------------------------------------------------------------------------------------
# The corpus


def raise_bad_inputs_as_themselves() -> None:
    """Let a ``BadInputError`` raised in a Ray Data task (``on_bad_input: fail``) reach the driver
    as itself, the user's mistake naming the file (the CLI's status 2), instead of Ray Data's
    ``UserCodeException`` around its text. Call before building a dataset that decodes images."""
    import ray.data

    ray.data.DataContext.get_current().raise_original_map_exception = True


class Corpus:
    """A configured corpus: its layout, class names and a way to stream it as a Ray Dataset.

    A corpus without class names is unlabelled: its rows' labels are -1."""

    def __init__(
        self, data_cfg: DataSection, format: str, files: list[str], class_names: list[str]
    ):
        self.cfg = data_cfg
        self.format = format
        # Shard/Parquet URIs; for a folder corpus the folders read: each class folder, or the
        # root of an unlabelled one.
        self.files = files
        self.class_names = class_names

    @property
    def labelled(self) -> bool:
        return bool(self.class_names)

    def __repr__(self) -> str:
        classes = len(self.class_names) if self.labelled else "unlabelled"
        return f"Corpus({self.cfg.source!r}, format={self.format!r}, classes={classes})"

    def _parquet_columns(self) -> list[str]:
        label = self.cfg.label_column if self.labelled else None
        return _columns_read(self.cfg.image_column, label, self.cfg.key_column)

    def _raw(self, spec: _ReadSpec, interleave: int = 1):
        """The source as a Ray Dataset of undecoded rows (see ``dataset`` for ``interleave``)."""
        import json

        import ray

        fs, _ = storage.resolve(self.cfg.source)
        if interleave > 1 and self.format != "folder":
            units = self.units()
            if self.format == "webdataset":
                units = [{"uri": unit["files"][0]} for unit in units]
            groups = [
                {"group": json.dumps(units[i : i + interleave])}
                for i in range(0, len(units), interleave)
            ]
            return ray.data.from_items(groups, override_num_blocks=max(1, len(groups))).map_batches(
                _interleave_units,
                batch_size=1,
                fn_kwargs={"corpus_format": self.format, "root": self.cfg.source, "spec": spec},
            )
        if self.format == "folder":
            return ray.data.read_binary_files(
                [_fs_path(u) for u in self.files],
                include_paths=True,
                filesystem=fs,
                file_extensions=list(IMAGE_EXTENSIONS),
            )
        if self.format == "webdataset":
            return ray.data.read_webdataset(
                [_fs_path(u) for u in self.files],
                filesystem=fs,
                decoder=None,
                filerename=_wds_rename,
                fileselect=_wds_select,
            )
        # Parquet: Ray's reader does not say which row of its file a row was, and a row index is
        # the only stable key a Parquet corpus without a key column has; read row groups here.
        items = _parquet_row_groups(self.files, self._parquet_columns())
        return ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
            _read_row_groups,
            batch_size=1,
            fn_kwargs={"root": self.cfg.source, "spec": spec},
        )

    def dataset(
        self,
        split: str = "train",
        *,
        keep_errors: bool = False,
        skip_keys: Iterable[str] | np.ndarray | Any | None = None,
        interleave: int = 1,
    ):
        """A streaming ray.data.Dataset of decoded images.

        Columns: key (str), image (uint8 H x W x C at data.image_size / data.channels), label
        (int64), split (str). With ``keep_errors`` bad inputs stay in the stream as rows with a
        zero image, a non-empty ``error`` and their ``source`` (good rows have error ""); with
        ``skip_keys`` (keys, a ``key_hashes`` array or an ObjectRef of one) those rows are dropped
        before decoding, which is how an interrupted stage resumes.

        With ``interleave`` > 1, a WebDataset or Parquet corpus is read in groups of that many
        consecutive shards or row groups (in ``files`` order), whose rows alternate a few at a
        time, so that a corpus stored one class per file still yields class-mixed runs of rows
        (tokenize cuts its shards from such runs). A folder corpus is listed image by image and
        needs none.
        """
        import ray

        skip_ref = None
        if isinstance(skip_keys, ray.ObjectRef):
            skip_ref = skip_keys  # a sorted key_hashes array already in the object store
        elif skip_keys is not None:
            hashes = (
                skip_keys
                if isinstance(skip_keys, np.ndarray) and skip_keys.dtype == np.uint64
                else key_hashes(skip_keys)
            )
            if len(hashes):
                skip_ref = ray.put(np.sort(hashes))
        spec = self.read_spec(split, keep_errors=keep_errors, skip_ref=skip_ref)
        raise_bad_inputs_as_themselves()
        return self._raw(spec, interleave).map_batches(
            _decode_batch,
            batch_size=DECODE_BATCH,
            batch_format="numpy",
            fn_kwargs={"spec": spec},
        )

    def read_spec(
        self, split: str, *, keep_errors: bool, skip_ref: Any = None, keep_payload: bool = False
    ) -> _ReadSpec:
        """What a reader task needs to decode rows of ``split`` (see ``dataset``)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        root = self.cfg.source if self.format == "folder" else ""
        return _ReadSpec(
            format=self.format,
            root_path=_fs_path(root).rstrip("/") if root else "",
            class_index={name: i for i, name in enumerate(self.class_names)},
            num_classes=len(self.class_names),
            size_hw=tuple(self.cfg.size_hw),
            channels=self.cfg.channels,
            validation_fraction=self.cfg.validation_fraction,
            test_fraction=self.cfg.test_fraction,
            split=split,
            keep_errors=keep_errors,
            on_bad_input=self.cfg.on_bad_input,
            labelled=self.labelled,
            skip_ref=skip_ref,
            label_column=self.cfg.label_column,
            image_column=self.cfg.image_column,
            key_column=self.cfg.key_column,
            keep_payload=keep_payload,
        )

    # ---------------------------------------------------------------------------------------------
    # Work units: the corpus cut into pieces that do not depend on scheduling

    def units(self) -> list[dict[str, Any]]:
        """The corpus as a deterministic list of small work units (JSON-able dicts).

        Folder: the image files sorted by key hash, in groups of ``FOLDER_UNIT_FILES`` (so every
        unit is a class-blind sample of the corpus, whatever order the folders list in);
        webdataset: one unit per shard; parquet: one unit per row group. The list, and what each
        unit holds, depend on the corpus alone, never on how Ray schedules the reads.
        """
        if self.format == "folder":
            root = _fs_path(self.cfg.source).rstrip("/")
            files = []
            for class_dir in self.files:
                base = _fs_path(class_dir).rstrip("/")
                for uri in storage.list_files(class_dir):
                    name = os.path.basename(uri)
                    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
                    # Hidden entries directly below the folder read are skipped, as Ray's reader
                    # skips them (the root of an unlabelled folder may hold hidden folders).
                    inner = _fs_path(uri)[len(base) :].lstrip("/")
                    if (
                        ext in IMAGE_EXTENSIONS
                        and not name.startswith((".", "_"))
                        and not (inner.startswith((".", "_")))
                    ):
                        rel = _fs_path(uri)[len(root) :].lstrip("/")
                        files.append((key_hash(sanitize_key(os.path.splitext(rel)[0])), uri))
            files.sort()
            uris = [uri for _, uri in files]
            return [
                {"files": uris[i : i + FOLDER_UNIT_FILES]}
                for i in range(0, len(uris), FOLDER_UNIT_FILES)
            ]
        if self.format == "webdataset":
            return [{"files": [uri]} for uri in self.files]
        return _parquet_row_groups(self.files, self._parquet_columns())

    def read_unit(self, unit: dict[str, Any], spec: _ReadSpec) -> dict[str, np.ndarray] | None:
        """Decode one work unit of ``units`` (rows in a fixed order) with ``spec``; None when no
        row is left."""
        if self.format == "folder":
            raw: dict[str, list] = {"path": [], "bytes": []}
            for uri in unit["files"]:
                raw["path"].append(_fs_path(uri))
                raw["bytes"].append(storage.read_bytes(uri))
        elif self.format == "webdataset":
            raw = _read_wds_shard(unit["files"][0])
        else:
            items = {k: [unit[k]] for k in ("uri", "row_group", "first_row")}
            raw = next(_read_row_groups(items, self.cfg.source, spec))
        if not len(next(iter(raw.values()), [])):
            return None
        out = _decode_batch(raw, spec)
        return out if isinstance(out, dict) else None  # a typed empty table: no row left


def _read_wds_shard(uri: str) -> dict[str, list]:
    """One WebDataset shard as the raw columns Ray's reader gives (``__key__``, ``__url__``,
    ``image``, ``cls``), samples in tar order."""
    raw: dict[str, list] = {"__key__": [], "__url__": [], "image": [], "cls": []}
    for chunk in _wds_chunks(uri):
        for name, values in chunk.items():
            raw[name].extend(values)
    return raw


def _count_classes(corpus_format: str, files: list[str], label_column: str) -> int:
    """1 + the largest label in a WebDataset or Parquet corpus (one pass over its labels only);
    0 when it holds no label at all."""
    largest = -1
    if corpus_format == "parquet":
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        for uri in files:
            fs, path = storage.resolve(uri)
            with fs.open_input_file(path) as f:
                column = pq.read_table(f, columns=[label_column]).column(label_column)
            value = pc.max(column).as_py()
            largest = max(largest, -1 if value is None else int(value))
    else:
        import ray

        fs, _ = storage.resolve(files[0])
        ds = ray.data.read_webdataset(
            [_fs_path(u) for u in files], filesystem=fs, decoder=None, fileselect=_wds_select_labels
        )

        def batch_max(batch: dict) -> dict:
            values = [int(b.decode()) for b in map(_as_bytes, batch.get("cls", [])) if b]
            return {"largest": np.array([max(values, default=-1)], dtype=np.int64)}

        for row in ds.map_batches(batch_max, batch_format="numpy").iter_rows():
            largest = max(largest, int(row["largest"]))
    return largest + 1


def _parquet_has_column(files: list[str], column: str) -> bool:
    """Whether the Parquet files have ``column``: all of them (True) or none (False); a column
    that only some have is an InputError naming a file without it."""
    import pyarrow.parquet as pq

    having = []
    for uri in files:
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            having.append(column in pq.ParquetFile(f).schema_arrow.names)
    if any(having) and not all(having):
        lacking = files[having.index(False)]
        raise InputError(
            f"{lacking} lacks the label column {column!r} (data.label_column) that other files of "
            f"{files[0]!r}'s corpus have; give every file its labels, or set data.labels: none"
        )
    return all(having)


def _labels_missing(what: str) -> InputError:
    """The error for a corpus without labels when ``data.labels`` is 'required'."""
    return InputError(
        f"{what} (data.labels is 'required'; set it to 'auto' or 'none' to use the corpus "
        "unlabelled)"
    )


def _open_folder(data_cfg: DataSection) -> Corpus:
    source = data_cfg.source
    if not storage.is_dir(source):
        raise MissingInputError(f"data.source {source!r} is not a folder of class subfolders")
    if data_cfg.labels == "none":
        return Corpus(data_cfg, "folder", [source], [])
    class_names = _class_dirs(source)
    flat = _top_level_images(source)
    if class_names and flat:
        raise InputError(
            f"{source!r} holds both class subfolders {class_names[:5]} and images at its top level "
            f"(such as {os.path.basename(flat[0])!r}): a labelled corpus keeps every image in a "
            "class folder, an unlabelled one every image at the top; move them, or set "
            "data.labels: none to read every image without labels"
        )
    if not class_names:
        message = f"{source!r} has no class subfolders (expected root/<class>/*.png)"
        if not flat:
            raise InputError(
                f"{message[:-1]}, or images at its top level for an unlabelled corpus)"
            )
        if data_cfg.labels == "required":
            raise _labels_missing(message)
        if data_cfg.class_names is not None:
            raise InputError(
                f"data.class_names {data_cfg.class_names} names classes, but {source!r} is a "
                "flat folder of images without class subfolders; remove data.class_names"
            )
        log.info("%s: a flat folder of %d images, read without labels", source, len(flat))
        return Corpus(data_cfg, "folder", [source], [])
    if data_cfg.class_names is not None and list(data_cfg.class_names) != class_names:
        raise InputError(
            f"data.class_names {data_cfg.class_names} differs from the subfolders of {source!r} "
            f"{class_names}; a folder corpus takes its classes from its subfolders, so remove "
            "data.class_names"
        )
    return Corpus(data_cfg, "folder", [storage.join(source, c) for c in class_names], class_names)


def open_corpus(data_cfg: DataSection) -> Corpus:
    """Inspect ``data.source`` (layout, files, class names) without reading any image.

    A corpus without labels (``data.labels``, see the module docstring) has no class names."""
    source = data_cfg.source
    corpus_format = detect_format(source) if data_cfg.format == "auto" else data_cfg.format
    if corpus_format == "folder":
        return _open_folder(data_cfg)

    suffix = ".tar" if corpus_format == "webdataset" else ".parquet"
    files = _files_with_suffix(source, suffix)
    if not files:
        raise MissingInputError(f"no {suffix} files at data.source {source!r}")
    if data_cfg.labels == "none":
        return Corpus(data_cfg, corpus_format, files, [])
    if data_cfg.class_names is not None:
        return Corpus(data_cfg, corpus_format, files, list(data_cfg.class_names))
    if corpus_format == "parquet" and not _parquet_has_column(files, data_cfg.label_column):
        count = 0
        missing = (
            f"the Parquet files at {source!r} have no label column {data_cfg.label_column!r} "
            "(data.label_column)"
        )
    else:
        count = _count_classes(corpus_format, files, data_cfg.label_column)
        missing = f"found no labels in {files[0]} and its siblings"
        if not count and corpus_format == "parquet":
            # A label column without a single label is a broken labelled corpus; only a corpus
            # without the column is an unlabelled one.
            raise InputError(missing)
    if not count:
        if data_cfg.labels == "required":
            raise _labels_missing(missing)
        log.info("%s: %s; the corpus is read without labels", source, missing)
        return Corpus(data_cfg, corpus_format, files, [])
    class_names = [f"class_{i}" for i in range(count)]
    log.info("%s: %d classes found; set data.class_names to name them", source, count)
    return Corpus(data_cfg, corpus_format, files, class_names)
