"""Paths and URLs the pipeline reads and writes: local folders and object stores alike.

Everything goes through pyarrow's filesystems (``s3://``, ``gs://``, ``hdfs://``, local paths, and any
fsspec filesystem pyarrow can wrap), so a stage never cares where its output lives.

``s3://`` URLs reach any S3-compatible store through the standard AWS environment variables:
``AWS_ENDPOINT_URL`` (e.g. ``http://minio:9000``; ``http`` and ``https`` both work),
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or any other source the AWS SDK reads, such as an
instance role) and ``AWS_DEFAULT_REGION``. Credentials are never copied into the filesystem object,
so they are not pickled into Ray tasks: each process reads its own environment.

Writes are atomic: bytes land under a temporary name (``<name>.<random>.partial``) and are moved
to the final name when complete. On a local disk the move is a rename; on an object store it is a
server-side copy, and a copy, like any PUT, makes the object visible only once it is whole. A crashed
writer can leave a ``.partial`` object, never a final name with half its bytes; listings skip
``.partial`` names and ``remove_partials`` deletes them.

Object-store calls are retried with exponential backoff for ``VQPIPE_STORAGE_RETRY_SECONDS``
(default 60) when they fail with anything but "not found", so a store that is unreachable for a
few seconds does not kill a run; one that stays down raises ``StorageError`` naming the URL.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from pipelines.errors import UserError

log = logging.getLogger("vqpipe")

TMP_SUFFIX = ".partial"
RETRY_SECONDS_ENV = "VQPIPE_STORAGE_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 60.0
FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 8.0

T = TypeVar("T")


class StorageError(UserError, OSError):
    """An object-store operation that kept failing after every retry (the URL is named)."""


def is_url(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def s3_options_from_env() -> dict[str, str]:
    """S3FileSystem keyword arguments for the endpoint and region in the AWS environment variables.

    Credentials are left to the AWS SDK's own lookup (the same environment variables, a profile or
    an instance role), so they never travel inside a pickled filesystem.
    """
    options: dict[str, str] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"AWS_ENDPOINT_URL {endpoint!r} is not an http(s)://host[:port] URL")
        options["endpoint_override"] = parts.netloc
        options["scheme"] = parts.scheme
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        options["region"] = region
    return options


@functools.lru_cache(maxsize=16)
def _s3_filesystem(options: tuple[tuple[str, str], ...]) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(**dict(options))


@functools.lru_cache(maxsize=64)
def _filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(uri)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URL."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if not is_url(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    if uri.lower().startswith("s3://"):
        parts = urlsplit(uri)
        if not parts.netloc:
            raise ValueError(f"{uri!r} names no bucket (expected s3://BUCKET/KEY)")
        # The environment is part of the key: a process that changes its endpoint gets a new client.
        fs = _s3_filesystem(tuple(sorted(s3_options_from_env().items())))
        return fs, (parts.netloc + parts.path).rstrip("/")
    # pyarrow wants the bucket-level URI to build the filesystem; the path keeps the rest.
    return _filesystem_for(uri)


def _retry_seconds() -> float:
    raw = os.environ.get(RETRY_SECONDS_ENV)
    if raw is None:
        return DEFAULT_RETRY_SECONDS
    try:
        return max(float(raw), 0.0)
    except ValueError:
        raise ValueError(f"{RETRY_SECONDS_ENV}={raw!r} is not a number of seconds") from None


def _retrying(what: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Retry an operation on ``uri`` (its first argument) while an object store keeps failing.

    Local paths are not retried (their errors do not go away by waiting); "not found" is an answer,
    not a failure, and is raised at once.
    """

    def decorate(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def wrapper(uri: str, *args, **kwargs) -> T:
            if not is_url(uri):
                return fn(uri, *args, **kwargs)
            budget = _retry_seconds()
            started = time.monotonic()
            delay = FIRST_BACKOFF_SECONDS
            attempt = 0
            while True:
                attempt += 1
                try:
                    return fn(uri, *args, **kwargs)
                except (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError):
                    raise
                except OSError as exc:
                    waited = time.monotonic() - started
                    if waited + delay > budget:
                        raise StorageError(
                            f"{what} {uri!r} failed {attempt} time(s) over {waited:.1f} s "
                            f"(retry budget {RETRY_SECONDS_ENV}={budget:g}): {exc}"
                        ) from exc
                    log.warning(
                        "%s %s failed (attempt %d), retrying in %.1f s: %s",
                        what,
                        uri,
                        attempt,
                        delay,
                        exc,
                    )
                    time.sleep(delay * (0.5 + random.random() / 2))
                    delay = min(delay * 2, MAX_BACKOFF_SECONDS)

        return wrapper

    return decorate


def join(base: str, *parts: str) -> str:
    if is_url(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


@_retrying("checking")
def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


@_retrying("checking")
def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


@_retrying("creating")
def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


@_retrying("listing")
def list_files(uri: str, recursive: bool = True) -> list[str]:
    """Every file under ``uri``, as URIs of the same kind as ``uri``, sorted."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File)
    return [_to_uri(uri, path, f) for f in files]


@_retrying("listing")
def file_sizes(uri: str) -> dict[str, int]:
    """Bytes of each file directly in the folder ``uri``, by file name: one listing call."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    return {i.base_name: i.size for i in infos if i.type == pafs.FileType.File}


@_retrying("listing")
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


@_retrying("reading")
def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


@_retrying("writing")
def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically (temporary name, then move; see the module doc).

    A retry after a failure writes a fresh temporary object, so a half-finished attempt is never
    moved into place.
    """
    fs, path = resolve(uri)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.create_dir(parent, recursive=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


@_retrying("removing")
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


@_retrying("listing")
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
