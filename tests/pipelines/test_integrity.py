"""Integrity checks, each triggered: inputs that changed after a stage wrote them are refused with
the documented error, and nothing already written is lost.

On the session's shared pipeline run (tests/conftest.py), each test damages one of its
files the way a user or a bucket could, runs the stage that reads it, and puts the file back.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from pipelines.errors import InputError, ManifestError, MissingInputError
from pipelines.runner import run_stages
from tests.pipelines.conftest import digests

STAGES = ("train_vqvae", "tokenize", "train_prior", "sample", "evaluate")


@pytest.fixture
def trained(shared_run):
    return shared_run.cfg, shared_run.manifests


@pytest.fixture
def damage(tmp_path):
    """damage(path, new_bytes): replace a file for one test; it is restored afterwards."""
    saved: list[tuple[str, str]] = []

    def replace(path: str, data: bytes | None) -> None:
        backup = str(tmp_path / f"backup-{len(saved)}")
        shutil.copy2(path, backup)
        saved.append((path, backup))
        if data is None:
            os.remove(path)
        else:
            Path(path).write_bytes(data)

    yield replace
    for path, backup in reversed(saved):
        shutil.copy2(backup, path)


def _stage_dirs(cfg) -> dict[str, dict[str, str]]:
    return {stage: digests(os.path.join(cfg.output_dir, stage)) for stage in STAGES}


@pytest.mark.parametrize("how", ["changed", "truncated", "missing"])
def test_a_damaged_code_shard_stops_train_prior_and_keeps_its_last_outputs(trained, damage, how):
    cfg, manifests = trained
    shard = manifests["tokenize"].shards[0].uri
    before = _stage_dirs(cfg)
    data = Path(shard).read_bytes()
    damage(shard, {"changed": data[:-1] + b"\x01" + b"\0" * 512, "truncated": data[:1024],
                   "missing": None}[how])  # fmt: skip
    error = MissingInputError if how == "missing" else InputError
    with pytest.raises(error, match=f"code shard {shard} (is missing|has [0-9]+ bytes)"):
        run_stages(cfg, ["train_prior"], force=["train_prior"], run_name=how)
    after = _stage_dirs(cfg)
    assert after["train_prior"] == before["train_prior"], "the last priors are kept"
    damaged = os.path.basename(shard)
    for files in (before["tokenize"], after["tokenize"]):
        files.pop(damaged, None)
    assert after == before, "every other file is as it was"


@pytest.mark.parametrize("how", ["swapped", "truncated", "foreign"])
def test_a_tokenizer_checkpoint_changed_after_tokenize_stops_sampling(trained, damage, how):
    cfg, manifests = trained
    checkpoint = manifests["train_vqvae"].checkpoint
    data = Path(checkpoint).read_bytes()
    prior = next(iter(manifests["train_prior"].priors.values())).checkpoint
    replacement = {
        # Another model's weights in the same format: same size, other bytes.
        "swapped": data.replace(b"bottom", b"b0ttom", 1) if b"bottom" in data else data[::-1],
        "truncated": data[: len(data) // 2],
        "foreign": Path(prior).read_bytes(),
    }[how]
    damage(checkpoint, replacement)
    before = _stage_dirs(cfg)
    with pytest.raises(InputError, match="changed since the code shards were made") as caught:
        run_stages(cfg, ["sample"], force=["sample"], run_name=how)
    sha = hashlib.sha256(replacement).hexdigest()[:16]
    assert sha in str(caught.value) and manifests["tokenize"].tokenizer.sha256[:16] in str(
        caught.value
    )
    assert _stage_dirs(cfg) == before, "the last samples are kept"


def test_a_manifest_of_another_format_version_is_refused_before_anything_runs(trained, damage):
    cfg, _ = trained
    path = os.path.join(cfg.output_dir, "tokenize", "manifest.json")
    document = json.loads(Path(path).read_text())
    document["version"] = document["version"] + 1
    damage(path, json.dumps(document).encode())
    before = _stage_dirs(cfg)
    with pytest.raises(ManifestError, match=f"version {document['version']}"):
        run_stages(cfg, ["train_prior"], force=["train_prior"], run_name="version")
    assert _stage_dirs(cfg) == before
