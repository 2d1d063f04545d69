"""pipelines.data.storage against a real S3-compatible server over HTTP, configured by AWS_* variables."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipelines.data import storage
from tests.cluster import services
from tests.cluster.conftest import ACCESS_KEY, _create_bucket


def test_roundtrip_through_the_endpoint_in_the_environment(aws_env, s3_server):
    base = s3_server.url("storage", "roundtrip")
    fs, path = storage.resolve(base)
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{s3_server.bucket}/storage/roundtrip"
    storage.write_bytes(storage.join(base, "a", "x.bin"), b"hello")
    storage.write_bytes(storage.join(base, "b.bin"), b"world")
    assert storage.read_bytes(storage.join(base, "a", "x.bin")) == b"hello"
    assert storage.exists(storage.join(base, "b.bin"))
    assert not storage.exists(storage.join(base, "missing.bin"))
    assert storage.list_files(base) == [storage.join(base, "a/x.bin"), storage.join(base, "b.bin")]
    assert storage.list_dirs(base) == ["a"]
    rows = storage.listing_fingerprint(base)
    assert [(r[0], r[1]) for r in rows] == [("a/x.bin", 5), ("b.bin", 5)]
    storage.remove(storage.join(base, "a"))
    assert storage.list_files(base) == [storage.join(base, "b.bin")]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(base, "missing.bin"))


def test_the_filesystem_carries_no_credentials(aws_env, s3_server, secret_key):
    import pickle

    fs, _ = storage.resolve(s3_server.url("x"))
    blob = pickle.dumps(fs)  # what Ray ships to the tasks that read and write shards
    assert secret_key.encode() not in blob and ACCESS_KEY.encode() not in blob
    assert f"127.0.0.1:{s3_server.port}".encode() in blob


def test_endpoint_must_be_an_http_url(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "ftp://store:21")
    with pytest.raises(ValueError, match="ftp://store:21"):
        storage.resolve("s3://bucket/key")


def test_partial_objects_never_look_finished(aws_env, s3_server):
    base = s3_server.url("storage", "partial")
    storage.write_bytes(storage.join(base, "done.bin"), b"complete")
    # What a writer that died mid-upload leaves behind: only its temporary name.
    fs, path = storage.resolve(base)
    with fs.open_output_stream(f"{path}/big.bin.1234abcd{storage.TMP_SUFFIX}") as f:
        f.write(b"half")
    assert not storage.exists(storage.join(base, "big.bin"))
    assert [r[0] for r in storage.listing_fingerprint(base)] == ["done.bin"]
    assert storage.remove_partials(base) == 1
    assert storage.list_files(base) == [storage.join(base, "done.bin")]


@pytest.fixture
def private_s3(cluster_root: Path, secret_key: str, monkeypatch):
    """An S3 server of its own (stopping the shared one would lose its contents)."""
    root = cluster_root / f"s3-{time.monotonic_ns()}"
    root.mkdir()
    (root / "home").mkdir()
    server = services.start_s3(root, "faults", ACCESS_KEY, secret_key)
    try:
        _create_bucket(server)
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        yield server
    finally:
        server.service.stop()


def test_store_down_for_seconds_then_back(private_s3):
    """Writes and reads issued while the store is down succeed once it is back."""
    uri = private_s3.url("blink", "model.bin")
    storage.write_bytes(uri, b"v1")
    private_s3.service.kill()
    private_s3.service.proc.wait(timeout=10)
    down_for = 4.0

    def come_back():
        time.sleep(down_for)
        private_s3.restart()
        _create_bucket(private_s3)  # moto keeps objects in memory: the bucket starts empty

    thread = threading.Thread(target=come_back)
    started = time.monotonic()
    thread.start()
    try:
        storage.write_bytes(uri, b"v2")  # retried until the store answers again
        recovered = time.monotonic() - started
    finally:
        thread.join()
    assert recovered >= down_for
    assert storage.read_bytes(uri) == b"v2"
    assert storage.list_files(private_s3.url("blink")) == [uri]  # no stray .partial
    print(f"store down {down_for:.0f} s: write completed after {recovered:.1f} s")


def test_store_that_stays_down_names_the_url(private_s3, monkeypatch):
    monkeypatch.setenv(storage.RETRY_SECONDS_ENV, "3")
    uri = private_s3.url("gone", "manifest.json")
    private_s3.service.stop()
    started = time.monotonic()
    with pytest.raises(storage.StorageError) as info:
        storage.read_bytes(uri)
    elapsed = time.monotonic() - started
    assert uri in str(info.value) and "reading" in str(info.value)
    assert elapsed < 15, f"gave up after {elapsed:.1f} s with a 3 s budget"
