"""A corpus that grows and shrinks between scheduled runs of the pipeline.

With the autoencoder's config unchanged, added images are encoded alone into new shards (old
shards keep their bytes, the autoencoder is not retrained), removed images leave every reader of
the code shards, and the priors are due again, on the new shard set. Real local Ray, real shards,
real MLflow SQLite store, driven through ``run_stages`` as the nightly job would. The runs stop at
tokenize: that a stage whose fingerprint moved runs again is tested with the runner
(test_end_to_end.py), and what the priors would read is read here with their reader.
"""

from __future__ import annotations

import hashlib
import os
import shutil

import pyarrow.parquet as pq
import pytest

from pipelines.config import parse_config
from pipelines.data import storage
from pipelines.data.demo_data import generate_corpus
from pipelines.data.epochs import EpochReader
from pipelines.data.shards import (
    code_dataset,
    iter_code_samples,
    iter_manifest_samples,
    list_shards,
)
from pipelines.runner import manifest_fingerprint, run_stages, stage_fingerprint
from pipelines.stages import STAGES
from tests.pipelines.conftest import tiny_raw_config

CLASSES = ["circle", "square", "triangle", "cross"]
PER_CLASS = 4  # N = 16
ADDED_PER_CLASS = 2  # M = 8


def _spec(name: str):
    return next(s for s in STAGES if s.name == name)


def _shard_bytes(stage_dir: str) -> dict[str, str]:
    return {
        os.path.basename(uri): hashlib.sha256(open(uri, "rb").read()).hexdigest()
        for uri in list_shards(stage_dir)
    }


def _corpus_keys(root: str) -> set[str]:
    return {
        f"{cls}/{os.path.splitext(name)[0]}"
        for cls in CLASSES
        for name in os.listdir(os.path.join(root, cls))
    }


@pytest.fixture(scope="module")
def history(ray_local, tmp_path_factory):
    """Run the pipeline up to tokenize on N images, again after adding M, again after removing K,
    and once more with --force train_vqvae; record each run's outcomes and the shard files after
    it. That the priors are due again after each change shows in their fingerprint, which moves
    with the tokenize manifest."""
    root = tmp_path_factory.mktemp("growing")
    corpus = str(root / "corpus")
    generate_corpus(corpus, classes=CLASSES, images_per_class=PER_CLASS, image_size=16)
    cfg = parse_config(tiny_raw_config(str(root / "out"), corpus))
    tok_dir = storage.join(cfg.output_dir, "tokenize")
    runs: dict[str, dict] = {}

    def record(name: str, outcomes: dict) -> None:
        """What the tests check, read right after the run (a later run may clear the shards)."""
        tok = outcomes["tokenize"].manifest
        runs[name] = {
            "outcomes": outcomes,
            "keys": _corpus_keys(corpus),
            "shards": _shard_bytes(tok_dir),
            "stored": {s.name: [x["key"] for x in iter_code_samples([s.uri])] for s in tok.shards},
            "read": sorted(x["key"] for x in iter_manifest_samples(tok)),
            "removed_table": (
                pq.read_table(tok.removed_table).to_pylist() if tok.removed_table else []
            ),
            "dataset": {
                split: sorted(r["key"] for r in code_dataset(tok, split).take_all())
                for split in ("all", "train", "validation", "test")
            },
            # What the priors train on: the training reader over the same manifest.
            "trained_on": sorted(
                str(k)
                for batch in EpochReader.for_code_shards(
                    [shard.uri for shard in tok.shards],
                    list(tok.levels),
                    "all",
                    validation_fraction=tok.validation_fraction,
                    test_fraction=tok.test_fraction,
                    seed=0,
                    shuffle_buffer=8,
                    columns=("key",),
                    removed=tok.removed_keys(),
                ).batches(0, 0, 1, 4)
                for k in batch["key"]
            ),
            "downstream": {
                s: stage_fingerprint(cfg, _spec(s), "listing")
                for s in ("train_prior", "sample", "evaluate")
            },
        }

    record("first", run_stages(cfg, ["train_vqvae", "tokenize"], run_name="first"))

    # M new images, under names the corpus did not have.
    extra = str(root / "extra")
    generate_corpus(extra, classes=CLASSES, images_per_class=ADDED_PER_CLASS, image_size=16, seed=1)
    for cls in CLASSES:
        for name in os.listdir(os.path.join(extra, cls)):
            shutil.copy(os.path.join(extra, cls, name), os.path.join(corpus, cls, f"new-{name}"))
    record("grown", run_stages(cfg, ["train_vqvae", "tokenize"], run_name="grown"))

    # K removed: three of the first images and two of the added ones.
    removed = (
        sorted(runs["first"]["keys"])[:3]
        + sorted(runs["grown"]["keys"] - runs["first"]["keys"])[:2]
    )
    for key in removed:
        os.remove(os.path.join(corpus, key + ".png"))
    record("shrunk", run_stages(cfg, ["tokenize"], run_name="shrunk"))
    runs["removed"] = set(removed)

    record("forced", run_stages(cfg, ["train_vqvae", "tokenize"], force=["train_vqvae"]))
    return cfg, runs


def test_added_images_alone_are_encoded_into_new_shards(history):
    _, runs = history
    first, grown = runs["first"], runs["grown"]
    n, m = len(first["keys"]), len(grown["keys"]) - len(first["keys"])
    assert (n, m) == (PER_CLASS * len(CLASSES), ADDED_PER_CLASS * len(CLASSES))

    tok = grown["outcomes"]["tokenize"]
    assert not tok.skipped
    assert tok.manifest.metrics["new_samples"] == m  # exactly the M new images were encoded
    assert tok.manifest.metrics["resumed_samples"] == n
    assert tok.manifest.samples == n + m
    assert sum(sum(s.class_counts.values()) for s in tok.manifest.shards) == n + m

    # Old shards kept byte for byte; the new ones hold exactly the added images.
    for name, digest in first["shards"].items():
        assert grown["shards"][name] == digest, f"{name} changed"
    new_keys = [
        k for name, keys in grown["stored"].items() if name not in first["shards"] for k in keys
    ]
    assert sorted(new_keys) == sorted(grown["keys"] - first["keys"])
    # Every image exactly once over all shards, whichever reader.
    assert grown["read"] == grown["dataset"]["all"] == sorted(grown["keys"])


def test_the_autoencoder_is_kept_and_the_priors_are_due_on_the_grown_shards(history):
    _, runs = history
    first, grown = runs["first"]["outcomes"], runs["grown"]["outcomes"]
    assert grown["train_vqvae"].skipped
    assert grown["train_vqvae"].manifest == first["train_vqvae"].manifest
    # The priors follow the tokenize manifest (sample and evaluate follow the priors'): their
    # fingerprint moved, so priors trained on the first corpus would train again.
    assert runs["grown"]["downstream"]["train_prior"] != runs["first"]["downstream"]["train_prior"]
    # The priors' reader of the grown manifest reads the grown corpus (N + M), each image once.
    assert runs["grown"]["trained_on"] == sorted(runs["grown"]["keys"])
    assert len(runs["grown"]["keys"]) == len(CLASSES) * (PER_CLASS + ADDED_PER_CLASS)
    # After the removal the priors' inputs moved again (the tokenize manifest): they are due.
    assert runs["shrunk"]["downstream"]["train_prior"] != runs["grown"]["downstream"]["train_prior"]


def test_removed_images_leave_every_reader_without_rewriting_shards(history):
    _, runs = history
    grown, shrunk, removed = runs["grown"], runs["shrunk"], runs["removed"]
    tok = shrunk["outcomes"]["tokenize"].manifest
    live = grown["keys"] - removed
    assert len(removed) == 5 and shrunk["keys"] == live
    assert tok.samples == len(live) == len(grown["keys"]) - 5
    assert tok.removed == 5 and tok.metrics["new_samples"] == 0
    assert shrunk["shards"] == grown["shards"]  # no shard rewritten, none added
    assert sum(s.removed for s in tok.shards) == 5
    assert sum(sum(s.class_counts.values()) for s in tok.shards) == len(live)
    assert sorted(r["key"] for r in shrunk["removed_table"]) == sorted(removed)

    # The tars still hold the removed samples; the readers of a manifest's shards skip them.
    assert sum(len(keys) for keys in shrunk["stored"].values()) == len(grown["keys"])
    assert shrunk["read"] == shrunk["dataset"]["all"] == shrunk["trained_on"] == sorted(live)
    splits = {s: set(shrunk["dataset"][s]) for s in ("train", "validation", "test")}
    assert set().union(*splits.values()) == live
    assert sum(map(len, splits.values())) == len(live)
    assert tok.splits == {s: len(keys) for s, keys in splits.items()}


def test_forcing_the_autoencoder_redoes_tokenize_from_scratch(history):
    _, runs = history
    forced = runs["forced"]["outcomes"]
    assert not forced["train_vqvae"].skipped
    tok = forced["tokenize"].manifest
    live = runs["shrunk"]["keys"]
    assert tok.metrics["new_samples"] == tok.samples == len(live)
    assert tok.metrics["resumed_samples"] == 0
    assert tok.removed == 0 and tok.removed_table == ""
    assert runs["forced"]["read"] == sorted(live)


def test_which_changes_redo_which_stage(tiny_config, tmp_path):
    """The declarations: the listing is outside train_vqvae's and tokenize's identity, inside
    tokenize's manifest fingerprint and evaluate's identity; a model setting changes all."""
    cfg = tiny_config(str(tmp_path / "corpus"))
    bigger = tiny_config(str(tmp_path / "corpus"), ["train_vqvae.model.channels=32"])
    vq, tok, ev = _spec("train_vqvae"), _spec("tokenize"), _spec("evaluate")
    assert stage_fingerprint(cfg, vq, "old") == stage_fingerprint(cfg, vq, "new")
    assert stage_fingerprint(cfg, vq, "old") != stage_fingerprint(bigger, vq, "old")
    identity = stage_fingerprint(cfg, tok, "old")
    assert identity == stage_fingerprint(cfg, tok, "new")
    assert manifest_fingerprint(tok, identity, "old") != manifest_fingerprint(tok, identity, "new")
    assert stage_fingerprint(cfg, ev, "old") != stage_fingerprint(cfg, ev, "new")
