"""Typed manifests: written and read back by type, with clear errors for what cannot be trusted."""

from __future__ import annotations

import json

import pytest

from pipelines.errors import ManifestError, UserError
from pipelines.manifest import read_manifest, require_manifest, write_manifest
from pipelines.stage_manifests import PriorEntry, TrainPriorManifest, TrainVQVAEManifest
from pipelines.tokenizer import TokenizerIdentity
from tests.pipelines.stages.test_sample import prior_entry


def _priors() -> TrainPriorManifest:
    return TrainPriorManifest(
        levels=["top"],
        priors={"top": prior_entry("top.pt", None)},
        tokenizer=TokenizerIdentity(checkpoint="model.pt", sha256="0" * 64),
        image_size=[16, 16],
        channels=3,
        class_names=["a", "b"],
        corpora=[],
        fingerprint="abc",
    )


def test_round_trip_by_type(tmp_path):
    written = write_manifest(str(tmp_path), _priors())
    assert written.written_at
    assert (tmp_path / "train_prior" / "manifest.json").is_file()
    again = read_manifest(str(tmp_path), TrainPriorManifest)
    assert again == written and isinstance(again.priors["top"], PriorEntry)
    document = json.loads((tmp_path / "train_prior" / "manifest.json").read_text())
    assert document["stage"] == "train_prior" and document["version"] == 1


def test_missing_manifest_is_none_and_required_names_the_command(tmp_path):
    assert read_manifest(str(tmp_path), TrainVQVAEManifest) is None
    with pytest.raises(ManifestError, match="run `vqpipe train-vqvae` first"):
        require_manifest(str(tmp_path), TrainVQVAEManifest)
    assert issubclass(ManifestError, UserError)


def _write_document(tmp_path, mutate) -> None:
    write_manifest(str(tmp_path), _priors())
    path = tmp_path / "train_prior" / "manifest.json"
    document = json.loads(path.read_text())
    mutate(document)
    path.write_text(json.dumps(document))


def test_incomplete_manifest_names_the_missing_field(tmp_path):
    _write_document(tmp_path, lambda d: d.pop("priors"))
    with pytest.raises(ManifestError, match=r"incomplete or malformed \(priors: Field required"):
        read_manifest(str(tmp_path), TrainPriorManifest)


def test_renamed_field_is_an_error_not_ignored(tmp_path):
    _write_document(tmp_path, lambda d: d.update(prior_levels=d.pop("levels")))
    with pytest.raises(ManifestError, match="prior_levels"):
        read_manifest(str(tmp_path), TrainPriorManifest)


def test_other_version_or_stage_is_refused(tmp_path):
    _write_document(tmp_path, lambda d: d.update(version=99))
    with pytest.raises(ManifestError, match="version 99.*version 1.*--force"):
        read_manifest(str(tmp_path), TrainPriorManifest)
    _write_document(tmp_path, lambda d: d.update(stage="tokenize"))
    with pytest.raises(ManifestError, match="stage 'tokenize'"):
        read_manifest(str(tmp_path), TrainPriorManifest)


def test_truncated_json_is_reported(tmp_path):
    write_manifest(str(tmp_path), _priors())
    path = tmp_path / "train_prior" / "manifest.json"
    path.write_text(path.read_text()[:40])
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(str(tmp_path), TrainPriorManifest)
