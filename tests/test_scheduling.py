"""The test scheduler's tables (tests/conftest.py) name files that exist and do what they say."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import SCOPE_SECONDS, SHARED_RUN_READERS, scope_of

REPO = Path(__file__).resolve().parents[1]


def test_every_timed_scope_exists():
    for scope in SCOPE_SECONDS:
        if scope == "shared-run":
            continue
        assert (REPO / scope).exists(), f"SCOPE_SECONDS names {scope}, which is not there"


def test_every_shared_run_reader_reads_the_shared_run():
    for path in SHARED_RUN_READERS:
        text = (REPO / path).read_text()
        assert "shared_run" in text, f"{path} is scheduled with the shared run but does not use it"


def test_scopes():
    assert scope_of("tests/cluster/test_auth.py::test_x") == "tests/cluster/"
    assert scope_of("tests/jobs/test_console.py::test_x[a]") == "shared-run"
    assert scope_of("tests/vq_core/test_vqvae.py::TestA::test_x") == "tests/vq_core/test_vqvae.py"
