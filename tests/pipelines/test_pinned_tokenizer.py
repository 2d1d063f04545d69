"""Tokenize with a pinned tokenizer (a checkpoint path or a registered model), the one-line
``vqpipe tokenize``, and priors trained on the union of several corpora' code datasets: on a real
local Ray, real shards and a real MLflow SQLite store."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re

import mlflow
import numpy as np
import pytest
import torch
import yaml

from jobs.cli import main
from pipelines.config import parse_config
from pipelines.data import storage
from pipelines.data.code_union import unite
from pipelines.data.corpus import open_corpus
from pipelines.data.demo_data import generate_corpus
from pipelines.data.epochs import EpochReader
from pipelines.data.images import to_model_input
from pipelines.data.keys import split_of
from pipelines.data.shards import iter_manifest_samples
from pipelines.errors import InputError, MissingInputError, UserError
from pipelines.manifest import read_manifest
from pipelines.mlflow_models import log_checkpoint_model
from pipelines.runner import run_stages
from pipelines.stage_manifests import (
    EvaluateManifest,
    SampleManifest,
    TokenizeManifest,
    TrainPriorManifest,
)
from pipelines.stages import train_prior as train_prior_stage
from pipelines.tracking import Tracker
from tests.pipelines.conftest import tiny_raw_config
from vq_core.checkpoint import save_checkpoint
from vq_core.pixelsnail import PixelSNAIL, PixelSNAILConfig
from vq_core.vqvae import VQVAE2, VQVAE2Config

NET = {"channels": 16, "res_blocks": 1, "res_channels": 8, "embed_dim": 8}


def _autoencoder(seed: int, images: np.ndarray | None = None) -> VQVAE2:
    """A tiny VQ-VAE-2; with images, its codebooks are initialised from them (codes vary)."""
    torch.manual_seed(seed)
    model = VQVAE2(VQVAE2Config(codebook_size_top=16, codebook_size_bottom=16, **NET))
    if images is not None:
        model.train()
        with torch.no_grad():
            model(to_model_input(images))
    return model.eval()


def _save(model, path, image_size=(16, 16), channels=3) -> str:
    save_checkpoint(model, path, extra={"image_size": list(image_size), "channels": channels})
    return str(path)


def _sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _corpus(path, classes, images_per_class=5, seed=0) -> str:
    generate_corpus(
        str(path), classes=tuple(classes), images_per_class=images_per_class, image_size=16,
        seed=seed,
    )  # fmt: skip
    return str(path)


def _cfg(out, source, checkpoint="", overrides=()):
    raw = tiny_raw_config(str(out), source)
    raw["tokenize"]["checkpoint"] = checkpoint
    return parse_config(raw, overrides)


@pytest.fixture(scope="module")
def corpus_a(tmp_path_factory):
    return _corpus(tmp_path_factory.mktemp("a") / "shapes_a", ("circle", "square"))


@pytest.fixture(scope="module")
def pinned(tmp_path_factory, corpus_a):
    """A tokenizer checkpoint whose codebooks were initialised on corpus A."""
    cfg = _cfg(tmp_path_factory.mktemp("unused"), corpus_a)
    rows = open_corpus(cfg.data).dataset("all").take_all()
    images = np.stack([r["image"] for r in rows])
    return _save(_autoencoder(0, images), tmp_path_factory.mktemp("ckpt") / "tokenizer.pt")


def _codes_by_key(manifest: TokenizeManifest) -> dict[str, dict[str, np.ndarray]]:
    return {s["key"]: s for s in iter_manifest_samples(manifest)}


def _model_codes(checkpoint: str, cfg) -> dict[str, np.ndarray]:
    from vq_core.checkpoint import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    rows = open_corpus(cfg.data).dataset("all").take_all()
    top, bottom = model.encode(to_model_input(np.stack([r["image"] for r in rows])))
    return {r["key"]: (t.numpy(), b.numpy()) for r, t, b in zip(rows, top, bottom)}


def test_pinned_path_tokenizes_without_train_vqvae_and_a_new_checkpoint_redoes_it(
    tmp_path, corpus_a, pinned, ray_local
):
    checkpoint = str(tmp_path / "tok.pt")
    storage.write_bytes(checkpoint, storage.read_bytes(pinned))
    cfg = _cfg(tmp_path / "out", corpus_a, checkpoint)

    outcomes = run_stages(cfg, stages=["train_vqvae", "tokenize"])
    assert list(outcomes) == ["tokenize"], "train_vqvae is not run with a pinned tokenizer"
    assert not os.path.exists(storage.join(cfg.output_dir, "train_vqvae"))
    manifest = outcomes["tokenize"].manifest
    assert manifest.tokenizer.checkpoint == checkpoint
    assert manifest.tokenizer.sha256 == _sha256(checkpoint)
    assert manifest.tokenizer.model_name is None
    assert manifest.corpus_name == "shapes_a"
    assert manifest.samples == 10
    expected = _model_codes(checkpoint, cfg)
    stored = _codes_by_key(manifest)
    assert sorted(stored) == sorted(expected)
    for key, (top, bottom) in expected.items():
        np.testing.assert_array_equal(stored[key]["top"], top)
        np.testing.assert_array_equal(stored[key]["bottom"], bottom)

    assert run_stages(cfg, stages=["tokenize"])["tokenize"].skipped

    # Another tokenizer at the same path: tokenize is redone with it.
    _save(_autoencoder(1), checkpoint)
    again = run_stages(cfg, stages=["tokenize"])["tokenize"]
    assert not again.skipped
    assert again.manifest.tokenizer.sha256 == _sha256(checkpoint) != manifest.tokenizer.sha256
    expected = _model_codes(checkpoint, cfg)
    stored = _codes_by_key(again.manifest)
    for key, (top, bottom) in expected.items():
        np.testing.assert_array_equal(stored[key]["top"], top)
        np.testing.assert_array_equal(stored[key]["bottom"], bottom)


def test_registered_model_alias_is_pinned_to_its_version(tmp_path, corpus_a, pinned, ray_local):
    tracking_uri = f"sqlite:///{tmp_path}/registry.db"
    tracker = Tracker(tracking_uri, "tokenizers")
    images = np.zeros((1, 16, 16, 3), dtype=np.uint8)
    with tracker.stage_run("train_vqvae") as tracking:
        uri = log_checkpoint_model(
            tracking,
            "tokenizer",
            storage.read_bytes(pinned),
            images,
            {"top": np.zeros((1, 2, 2), np.int64), "bottom": np.zeros((1, 4, 4), np.int64)},
            "shapes-tokenizer",
            name="tokenizer",
        )
    assert uri == "models:/shapes-tokenizer/1"
    mlflow.MlflowClient(tracking_uri).set_registered_model_alias("shapes-tokenizer", "prod", "1")

    cfg = _cfg(
        tmp_path / "out",
        corpus_a,
        "models:/shapes-tokenizer@prod",
        [f"mlflow.tracking_uri={tracking_uri}"],
    )
    outcomes = run_stages(cfg, stages=["train_vqvae", "tokenize"])
    assert list(outcomes) == ["tokenize"]
    identity = outcomes["tokenize"].manifest.tokenizer
    assert identity.checkpoint == "models:/shapes-tokenizer/1"
    assert (identity.model_name, identity.model_version) == ("shapes-tokenizer", "1")
    assert identity.sha256 == _sha256(pinned)
    stored = _codes_by_key(outcomes["tokenize"].manifest)
    for key, (top, _) in _model_codes(pinned, cfg).items():
        np.testing.assert_array_equal(stored[key]["top"], top)


def test_one_line_cli_takes_the_image_size_from_the_checkpoint(
    tmp_path, corpus_a, pinned, ray_local, capsys
):
    out = tmp_path / "codes"
    rc = main(["-q", "tokenize", "--checkpoint", pinned, "--input", corpus_a, "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    manifest = read_manifest(str(out), TokenizeManifest)
    # The config default is 64x64; the checkpoint says 16x16.
    assert manifest.image_size == [16, 16] and manifest.channels == 3
    assert manifest.samples == 10 and manifest.tokenizer.sha256 == _sha256(pinned)
    assert not (out / "train_vqvae").exists()

    # --set still applies; a size that does not fit the tokenizer is refused, naming both.
    rc = main(
        ["tokenize", "--checkpoint", pinned, "--input", corpus_a, "--output", str(tmp_path / "x")]
        + ["--set", "data.image_size=32"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "[32, 32]" in err and "[16, 16]" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("case", ["prior", "random", "missing", "folder", "size", "channels"])
def test_bad_tokenizer_or_corpus_is_refused_before_anything_is_written(
    tmp_path, corpus_a, pinned, case
):
    checkpoint, overrides = pinned, []
    if case == "prior":
        prior = PixelSNAIL(
            PixelSNAILConfig(num_codes=8, height=2, width=2, channels=8, num_blocks=1,
                             res_blocks=1, num_heads=2, attention_channels=8)
        )  # fmt: skip
        checkpoint = _save(prior, tmp_path / "prior.pt")
    elif case == "random":
        checkpoint = str(tmp_path / "random.pt")
        storage.write_bytes(checkpoint, os.urandom(256))
    elif case == "missing":
        checkpoint = str(tmp_path / "nowhere.pt")
    elif case == "folder":
        checkpoint = str(tmp_path)
    elif case == "size":
        overrides = ["data.image_size=32"]
    else:
        overrides = ["data.channels=1"]
    out = tmp_path / "out"
    cfg = _cfg(out, corpus_a, checkpoint, overrides)
    expected = {
        "prior": "PixelSNAIL, not an autoencoder",
        "random": "not a vq_core checkpoint",
        "missing": "does not exist",
        "folder": "is a folder",
        "size": r"\[32, 32\] images with 3 channel\(s\), but the tokenizer",
        "channels": r"\[16, 16\] images with 1 channel\(s\), but the tokenizer",
    }[case]
    with pytest.raises(UserError, match=expected) as err:
        run_stages(cfg)
    if case in ("prior", "random", "missing"):
        assert checkpoint in str(err.value)
        assert isinstance(err.value, MissingInputError if case == "missing" else InputError)
    if case in ("size", "channels"):
        assert _sha256(pinned)[:16] in str(err.value)
    assert not out.exists(), "nothing may be written for a bad tokenizer or corpus"


@pytest.fixture(scope="module")
def two_corpora(tmp_path_factory, corpus_a, pinned, ray_local):
    """Corpus A (circle, square) and corpus B (square, triangle: the same keys for square)
    tokenized with the same pinned tokenizer, each into its own output_dir."""
    root = tmp_path_factory.mktemp("union")
    corpus_b = _corpus(root / "shapes_b", ("square", "triangle"), images_per_class=6, seed=1)
    outs = {}
    for name, source in (("a", corpus_a), ("b", corpus_b)):
        cfg = _cfg(root / f"out_{name}", source, pinned)
        outs[name] = run_stages(cfg, stages=["tokenize"])["tokenize"].manifest
    return root, outs, corpus_b


def test_union_of_two_corpora_prefixes_keys_and_merges_classes(two_corpora):
    root, outs, _ = two_corpora
    a, b = outs["a"], outs["b"]
    assert {k.split("/")[0] for k in _codes_by_key(a)} == {"circle", "square"}
    shared = set(_codes_by_key(a)) & set(_codes_by_key(b))
    assert shared, "the corpora share keys (square/...), which the union must keep apart"

    union = unite([a, b], ["a", "b"])
    assert union.class_names == ("circle", "square", "triangle")
    assert union.label_maps == ((0, 1), (1, 2))
    rows = union.dataset("all").take_all()
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == a.samples + b.samples
    names = {"circle": 0, "square": 1, "triangle": 2}
    for row in rows:
        corpus, key = row["key"].split("/", 1)
        assert corpus in ("shapes_a", "shapes_b")
        assert row["label"] == names[key.split("/")[0]]
    # A sample keeps the split of its stored key: the prefix moves nothing between splits.
    for split in ("train", "validation", "test"):
        for row in union.dataset(split).take_all():
            assert split_of(row["key"].split("/", 1)[1], 0.2, 0.2) == split

    reader = EpochReader.for_code_shards(
        union.shard_uris(), ["top", "bottom"], "train",
        validation_fraction=0.2, test_fraction=0.2, seed=0, shuffle_buffer=64,
        columns=("label", "key"), removed=union.removed(), label_maps=union.shard_label_maps(),
    )  # fmt: skip
    seen = {
        (str(key).split("/")[0], int(label))
        for batch in reader.batches(0, 0, 1, 8)
        for key, label in zip(batch["key"], batch["label"])
    }
    assert seen == {("circle", 0), ("square", 1), ("triangle", 2)}


@pytest.fixture(scope="module")
def union_run(two_corpora, pinned):
    """`vqpipe -q run` from B's output_dir with the priors on corpora A and B: a pipeline with a
    pinned tokenizer (no train_vqvae), tokenize done there already, then train_prior, sample and
    evaluate; then `vqpipe status`. Returns (config, raw config, run's stdout, status's stdout)."""
    root, outs, corpus_b = two_corpora
    raw = tiny_raw_config(str(root / "out_b"), corpus_b)
    raw["tokenize"]["checkpoint"] = outs["b"].tokenizer.checkpoint
    raw["train_prior"]["shards"] = [str(root / "out_a"), str(root / "out_b")]
    raw["sample"]["per_class"] = 4
    config = root / "union.yaml"
    config.write_text(yaml.safe_dump(raw))
    printed = []
    for argv in (["-q", "run", str(config)], ["status", str(config)]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        assert code == 0, out.getvalue() + err.getvalue()
        printed.append(out.getvalue())
    return parse_config(raw), raw, *printed


def test_pipeline_with_a_pinned_tokenizer_samples_and_evaluates(union_run, pinned):
    cfg, _, out, status = union_run
    assert "train_vqvae" not in out and "evaluate" in out
    assert not os.path.exists(storage.join(cfg.output_dir, "train_vqvae"))
    sample = read_manifest(cfg.output_dir, SampleManifest)
    assert sample.checkpoint == pinned
    assert sample.samples == 4 * 3  # per_class x the merged classes
    report = storage.read_bytes(
        storage.join(storage.join(cfg.output_dir, "evaluate"), "report.md")
    ).decode()
    assert f"pinned tokenizer {pinned}" in report
    # `vqpipe status` knows train_vqvae is not part of this pipeline.
    assert re.search(r"train_vqvae\s+disabled", status)
    for stage in ("tokenize", "train_prior", "sample", "evaluate"):
        assert re.search(rf"{stage}\s+done", status), status


def test_priors_train_on_the_union_and_evaluate_scores_this_corpus_in_the_merged_classes(
    two_corpora, union_run, pinned
):
    """Priors trained on corpora A and B from B's output_dir, then sampled and evaluated there:
    the priors learn the merged classes, B's test codes go to them under their merged labels, and
    CAS tests on the sampled classes B has images of."""
    _, outs, _ = two_corpora
    cfg, _, out, _ = union_run
    # Done by two_corpora, with this config's tokenize section: the run's summary says skipped.
    assert re.search(r"^  tokenize +skipped ", out, re.MULTILINE), out
    trained = read_manifest(cfg.output_dir, TrainPriorManifest)
    assert trained.class_names == ["circle", "square", "triangle"]
    assert [(c.name, c.labels, c.samples) for c in trained.corpora] == [
        ("shapes_a", [0, 1], outs["a"].samples),
        ("shapes_b", [1, 2], outs["b"].samples),
    ]
    assert trained.tokenizer.sha256 == _sha256(pinned)
    assert list(read_manifest(cfg.output_dir, SampleManifest).classes) == [
        "circle", "square", "triangle",
    ]  # fmt: skip

    metrics = read_manifest(cfg.output_dir, EvaluateManifest).metrics
    assert metrics["test/code_maps"] == outs["b"].splits["test"]
    assert all(np.isfinite(metrics[f"test/bits_per_code/{level}"]) for level in ("top", "bottom"))
    # circle was sampled (corpus A has it) but B has no real circle to test on.
    assert metrics["cas/classes"] == 2
    assert metrics["cas/real_test_images"] == outs["b"].splits["test"]
    report = storage.read_bytes(
        storage.join(storage.join(cfg.output_dir, "evaluate"), "report.md")
    ).decode()
    assert "left out of CAS, because the corpus has no images of them: circle" in report


def test_a_union_trained_elsewhere_needs_no_tokenize_there(two_corpora):
    """Priors on the union in an output_dir of their own: they read the code datasets the
    entries name, and nothing makes tokenize run in that folder."""
    root, outs, corpus_b = two_corpora
    entries = f"[{root / 'out_a'}, {root / 'out_b' / 'tokenize'}]"
    cfg = _cfg(root / "out_union", corpus_b, outs["b"].tokenizer.checkpoint,
               [f"train_prior.shards={entries}"])  # fmt: skip
    assert train_prior_stage._upstream_for(cfg) == ()
    union = train_prior_stage.code_union(cfg)
    assert union.class_names == ("circle", "square", "triangle")
    assert [m.samples for m in union.members] == [outs["a"].samples, outs["b"].samples]
    train_prior_stage._check_inputs(cfg)
    assert not os.path.exists(storage.join(cfg.output_dir, "tokenize"))


def test_union_refuses_code_datasets_of_another_tokenizer(two_corpora, tmp_path):
    root, outs, corpus_b = two_corpora
    other = _save(_autoencoder(7), tmp_path / "other.pt")
    made = run_stages(_cfg(tmp_path / "out_other", corpus_b, other), stages=["tokenize"])
    assert made["tokenize"].manifest.tokenizer.sha256 == _sha256(other)

    out = tmp_path / "out_union"
    entries = f"[{root / 'out_a'}, {tmp_path / 'out_other'}]"
    cfg = _cfg(out, corpus_b, other, [f"train_prior.shards={entries}"])
    with pytest.raises(InputError, match="mixes tokenizers") as err:
        run_stages(cfg, stages=["train_prior"])
    assert _sha256(other)[:16] in str(err.value)
    assert outs["a"].tokenizer.sha256[:16] in str(err.value)
    assert not out.exists()
