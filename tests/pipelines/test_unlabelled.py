"""The whole pipeline on an unlabelled corpus at the paper's resolution: a flat folder of 256x256
PNGs, as FFHQ is, through the real runner with a real local Ray, real shards and a real MLflow store.

Tokenize writes codes without a class, the priors are unconditional, sample draws sample.per_class
images in all, evaluate reports what needs no labels and why CAS is absent. At 256x256 (tiny
models, a few images and steps) every stage's shapes hold (32x32 top and 64x64 bottom codes,
256-pixel samples), so that a shape, dtype or memory mistake that only shows at high resolution
fails here rather than on a cluster, and the training cache holds the files, not their pixels."""

from __future__ import annotations

import os
import re
import tarfile

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from jobs.cli import main as cli_main
from pipelines.config import parse_config
from pipelines.data.code_union import unite
from pipelines.data.image_cache import cache_directory
from pipelines.data.shards import code_dataset, read_key_index
from pipelines.errors import ConfigError
from pipelines.runner import run_stages
from pipelines.stages import stage_names
from tests.pipelines.conftest import tiny_raw_config
from tests.pipelines.data.test_unlabelled_corpus import write_flat_folder
from vq_core.checkpoint import load_checkpoint

IMAGES = 40
SIZE = 256
COUNT = 4  # sample.per_class: for an unlabelled corpus, the images drawn in all


@pytest.fixture(scope="module")
def unlabelled_run(ray_local, tmp_path_factory):
    """Every stage once on a flat folder, then again (all skipped); the config file's path too."""
    root = tmp_path_factory.mktemp("unlabelled")
    source = write_flat_folder(root / "flat", IMAGES, SIZE)
    raw = tiny_raw_config(str(root / "out"), source)
    raw["data"]["image_size"] = SIZE
    raw["train_vqvae"]["model"] |= {"channels": 8, "res_channels": 4}
    few_steps = {"steps": 2, "batch_size": 2, "eval_every": 2, "checkpoint_every": 2}
    raw["train_vqvae"] |= few_steps
    for level in ("top", "bottom"):
        raw["train_prior"][level]["model"]["channels"] = 8
        raw["train_prior"][level] |= few_steps
    raw["sample"] = {"per_class": COUNT, "batch_size": 4}
    raw["evaluate"] |= {"batch_size": 2, "classifier_steps": 2}
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    cfg = parse_config(raw)
    first = run_stages(cfg, run_name="first")
    second = run_stages(cfg, run_name="second")
    return cfg, first, second, str(config)


def test_every_stage_runs_at_256_with_the_code_maps_of_its_downsampling(unlabelled_run):
    _, first, _, _ = unlabelled_run
    assert list(first) == list(stage_names())
    vq = first["train_vqvae"].manifest
    assert vq.image_size == [SIZE, SIZE]
    assert vq.code_shapes == {"top": [32, 32], "bottom": [64, 64]}
    tok = first["tokenize"].manifest
    assert tok.samples == IMAGES and tok.code_shapes == vq.code_shapes
    for row in code_dataset(tok, "all").take(2):
        assert np.asarray(row["top"]).shape == (32, 32)
        assert np.asarray(row["bottom"]).shape == (64, 64)


def test_the_training_cache_holds_the_files_not_their_pixels(unlabelled_run):
    cfg, _, _, _ = unlabelled_run
    directory = cache_directory(cfg.data, cfg.output_dir)
    parquet = [f for f in os.listdir(directory) if f.endswith(".parquet")]
    cached = sum(os.path.getsize(os.path.join(directory, f)) for f in parquet)
    corpus = sum(
        os.path.getsize(os.path.join(cfg.data.source, f))
        for f in os.listdir(cfg.data.source)
        if f.endswith(".png")
    )
    assert cached <= 1.2 * corpus + 16384
    assert cached < IMAGES * SIZE * SIZE * 3 / 2  # well under half the decoded pixels


def test_tokenize_writes_codes_without_a_class(unlabelled_run):
    cfg, first, _, _ = unlabelled_run
    tok = first["tokenize"].manifest
    assert tok.labelled is False and tok.class_names == []
    assert tok.samples == IMAGES and "unlabelled" in tok.summary()
    assert first["train_vqvae"].manifest.class_names == []
    for shard in tok.shards:
        assert shard.class_counts == {}
        with tarfile.open(shard.uri) as tar:
            names = tar.getnames()
        assert names and not [n for n in names if n.endswith(".cls")]
        assert set(read_key_index(shard.uri).column("label").to_pylist()) == {None}
    rows = code_dataset(tok, "all").take_all()
    assert len(rows) == IMAGES
    assert {r["label"] for r in rows} == {-1}
    # Keys are the file names: no class in them.
    assert sorted(r["key"] for r in rows) == [f"img-{i:03d}" for i in range(IMAGES)]
    # MLflow says so too.
    client = MlflowClient(f"sqlite:///{cfg.output_dir}/mlflow.db")
    assert client.get_run(tok.mlflow_run_id).data.params["corpus_labels"] == "unlabelled"


def test_the_priors_are_unconditional(unlabelled_run):
    _, first, _, _ = unlabelled_run
    trained = first["train_prior"].manifest
    assert trained.labelled is False and trained.class_names == []
    assert "unconditional" in trained.summary()
    for level in ("top", "bottom"):
        model, _ = load_checkpoint(trained.priors[level].checkpoint)
        assert model.config.num_classes == 0, level


def test_sample_draws_the_configured_number_of_images(unlabelled_run):
    _, first, _, _ = unlabelled_run
    sample = first["sample"].manifest
    assert sample.labelled is False and sample.class_names == []
    assert sample.samples == COUNT
    assert list(sample.classes) == ["unconditional"]
    entry = sample.classes["unconditional"]
    pngs = sorted(f for f in os.listdir(entry.dir) if f.endswith(".png"))
    assert len(pngs) == COUNT
    image = np.asarray(Image.open(os.path.join(entry.dir, pngs[0])))
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    assert os.path.isfile(entry.grid)
    assert "unlabelled" in sample.summary()


def test_evaluate_reports_what_needs_no_labels_and_why_cas_is_absent(unlabelled_run):
    _, first, _, _ = unlabelled_run
    evaluate = first["evaluate"].manifest
    metrics = evaluate.metrics
    for name in (
        "test/mse",
        "test/psnr",
        "test/bits_per_code/top",
        "test/bits_per_code/bottom",
        "quality/fid",
        "quality/fid_real_train",
        "quality/precision",
        "quality/recall",
    ):
        assert name in metrics, name
    assert not [k for k in metrics if k.startswith("cas/")]
    assert metrics["quality/generated_images"] == COUNT
    assert "the corpus has no labels" in evaluate.cas_skipped
    assert "randomly initialised" in evaluate.feature_network
    with open(evaluate.report) as f:
        report = f.read()
    assert "CAS not computed: the corpus has no labels" in report
    assert "unlabelled: no classes; the priors are unconditional" in report
    assert "Feature network: a randomly initialised" in report


def test_a_second_run_skips_every_stage_and_status_shows_them_done(unlabelled_run, capsys):
    _, first, second, config = unlabelled_run
    assert all(second[name].skipped for name in stage_names())
    assert {n: o.manifest.fingerprint for n, o in second.items()} == {
        n: o.manifest.fingerprint for n, o in first.items()
    }
    assert cli_main(["status", config]) == 0
    status = capsys.readouterr().out
    for stage in stage_names():
        assert re.search(rf"{stage}\s+done", status), status


def test_rejection_and_classes_on_an_unlabelled_corpus_are_refused_naming_the_key(unlabelled_run):
    _, first, _, config = unlabelled_run
    with open(config) as f:
        raw = yaml.safe_load(f)
    rejection = parse_config(raw, ["sample.rejection.enabled=true"])
    with pytest.raises(ConfigError, match=r"sample\.rejection\.enabled.*has no labels"):
        run_stages(rejection, stages=["sample"])
    classes = parse_config(raw, ["sample.classes=[circle]"])
    with pytest.raises(ConfigError, match=r"sample\.classes .*no class labels"):
        run_stages(classes, stages=["sample"])
    # Refused before anything was cleared: the samples are still there.
    entry = first["sample"].manifest.classes["unconditional"]
    assert len([f for f in os.listdir(entry.dir) if f.endswith(".png")]) == COUNT


def test_a_union_of_labelled_and_unlabelled_codes_is_refused(unlabelled_run):
    _, first, _, _ = unlabelled_run
    tok = first["tokenize"].manifest
    labelled = tok.model_copy(
        update={"labelled": True, "class_names": ["a", "b"], "corpus_name": "other"}
    )
    with pytest.raises(ConfigError, match="mixes labelled corpora with unlabelled ones"):
        unite([labelled, tok], ["labelled.json", "unlabelled.json"])


def test_decode_turns_unlabelled_codes_back_into_images(unlabelled_run, tmp_path):
    _, first, _, _ = unlabelled_run
    tok = first["tokenize"].manifest
    out = tmp_path / "decoded"
    checkpoint = first["train_vqvae"].manifest.checkpoint
    tokenize_dir = os.path.dirname(tok.shards[0].uri)
    command = ["decode", "--checkpoint", checkpoint, "--input", tokenize_dir, "--output", str(out)]
    assert cli_main(command) == 0
    assert sorted(os.listdir(out)) == [f"img-{i:03d}.png" for i in range(IMAGES)]
