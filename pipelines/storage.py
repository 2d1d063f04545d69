"""Paths and URLs the pipeline reads and writes: local folders and object stores alike.

Everything goes through pyarrow's filesystems (``s3://``, ``gs://``, ``hdfs://``, local paths, and any
fsspec filesystem pyarrow can wrap), so a stage never cares where its output lives. Writes are atomic:
bytes land under a temporary name and are renamed when complete, so a crash never leaves a file that
looks finished.
"""

from __future__ import annotations

import os
import uuid
from functools import lru_cache

import pyarrow.fs as pafs

TMP_SUFFIX = ".partial"


def is_url(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


@lru_cache(maxsize=64)
def _filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(uri)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URL."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if not is_url(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    # pyarrow wants the bucket-level URI to build the filesystem; the path keeps the rest.
    fs, path = _filesystem_for(uri)
    return fs, path


def join(base: str, *parts: str) -> str:
    if is_url(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def list_files(uri: str, recursive: bool = True) -> list[str]:
    """Every file under ``uri``, as URIs of the same kind as ``uri``, sorted."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File)
    return [_to_uri(uri, path, f) for f in files]


def list_dirs(uri: str) -> list[str]:
    """Names of the immediate subfolders of ``uri``, sorted."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def _to_uri(base_uri: str, base_path: str, path: str) -> str:
    if not is_url(base_uri):
        return path
    rel = path[len(base_path) :].lstrip("/")
    return join(base_uri, rel)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically (temporary name, then rename)."""
    fs, path = resolve(uri)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.create_dir(parent, recursive=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def upload_file(local_path: str, uri: str) -> None:
    """Copy a finished local file to ``uri`` atomically."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem) and os.path.abspath(local_path) == path:
        return
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
    pafs.copy_files(
        local_path, tmp, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
    )
    fs.move(tmp, path)


def remove(uri: str) -> None:
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def remove_partials(uri: str) -> int:
    """Delete temporary files a crashed writer left under ``uri``; returns how many."""
    removed = 0
    for f in list_files(uri):
        if f.endswith(TMP_SUFFIX):
            remove(f)
            removed += 1
    return removed


def listing_fingerprint(uri: str) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime in seconds) of every file under ``uri`` (or of ``uri`` itself).

    Stages hash this to notice a corpus that changed since they last ran.
    """
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        infos = [info]
    elif info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    else:
        raise FileNotFoundError(f"{uri!r} does not exist")
    rows = []
    for i in infos:
        if i.type != pafs.FileType.File or i.path.endswith(TMP_SUFFIX):
            continue
        mtime = int(i.mtime.timestamp()) if i.mtime is not None else 0
        rows.append((i.path[len(path) :].lstrip("/"), int(i.size or 0), mtime))
    return sorted(rows)
