"""The whole pipeline on a tiny generated corpus: real local Ray, real shards, real MLflow store."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from jobs.cli import main as cli_main
from pipelines.manifest import read_manifest
from pipelines.runner import run_stages
from pipelines.stages import STAGES, stage_names
from tests.pipelines.conftest import (
    SHARED_CLASSES,
    SHARED_CORRUPT,
    SHARED_PER_CLASS,
    restored,
)

CLASSES = SHARED_CLASSES
PER_CLASS = SHARED_PER_CLASS
CORRUPT = SHARED_CORRUPT


@pytest.fixture(scope="module")
def pipeline_run(shared_run):
    """The shared run (every stage once), then the same config again: (config, manifests of the
    first run, manifests of the second run)."""
    second = run_stages(shared_run.cfg, run_name="second")
    return shared_run.cfg, shared_run.outcomes, second


def test_every_stage_has_a_complete_manifest(pipeline_run):
    cfg, first, _ = pipeline_run
    assert list(first) == list(stage_names())
    for spec in STAGES:
        manifest = read_manifest(cfg.output_dir, spec.manifest)
        assert manifest is not None, spec.name
        assert manifest == first[spec.name].manifest
        assert manifest.fingerprint and manifest.mlflow_run_id
    vq = first["train_vqvae"].manifest
    assert os.path.isfile(vq.checkpoint)
    assert os.path.isfile(vq.artifacts["reconstructions"])
    priors = first["train_prior"].manifest.priors
    for level in ("top", "bottom"):
        assert os.path.isfile(priors[level].checkpoint)
        assert np.isfinite(priors[level].validation_bits_per_code)
    assert priors["bottom"].condition == "top"


def test_each_stage_reads_exactly_the_config_sections_it_declares(shared_rerun):
    """What a stage reads is traced; a section it reads but does not declare would escape its
    fingerprint (a changed setting would not redo the stage). Traced in this process: the
    shared config's rerun."""
    for spec in STAGES:
        assert shared_rerun[spec.name].sections_read == set(spec.reads), spec.name


def test_tokenize_counts_every_valid_image_once(pipeline_run):
    _, first, _ = pipeline_run
    tok = first["tokenize"].manifest
    assert tok.samples == PER_CLASS * len(CLASSES)
    assert tok.bad_inputs.count == CORRUPT
    assert sum(s.samples for s in tok.shards) == tok.samples
    assert tok.splits["train"] + tok.splits["validation"] + tok.splits["test"] == tok.samples
    assert tok.class_names == sorted(CLASSES)
    assert tok.code_dtypes == {"top": "uint8", "bottom": "uint8"}  # K = 16


def test_shards_read_back_with_tarfile_and_numpy(pipeline_run):
    _, first, _ = pipeline_run
    tok = first["tokenize"].manifest
    keys, labels = [], []
    for shard in tok.shards:
        with tarfile.open(shard.uri) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in members:
                if name.endswith(".top.npy"):
                    key = name[: -len(".top.npy")]
                    top = np.load(io.BytesIO(tar.extractfile(members[name]).read()))
                    bottom = np.load(
                        io.BytesIO(tar.extractfile(members[key + ".bottom.npy"]).read())
                    )
                    label = int(tar.extractfile(members[key + ".cls"]).read())
                    assert top.shape == tuple(tok.code_shapes["top"]) and top.dtype == np.uint8
                    assert bottom.shape == tuple(tok.code_shapes["bottom"])
                    keys.append(key)
                    labels.append(label)
    assert len(keys) == len(set(keys)) == tok.samples
    assert sorted(set(labels)) == list(range(len(CLASSES)))


def test_shards_read_back_with_webdataset(pipeline_run):
    import webdataset as wds

    _, first, _ = pipeline_run
    tok = first["tokenize"].manifest
    urls = [s.uri for s in tok.shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert len(samples) == tok.samples
    assert all(s["top.npy"].max() < 16 and s["bottom.npy"].max() < 16 for s in samples)


def test_samples_per_class_on_disk(pipeline_run):
    cfg, first, _ = pipeline_run
    classes = first["sample"].manifest.classes
    assert sorted(classes) == sorted(CLASSES)
    for name, info in classes.items():
        pngs = [f for f in os.listdir(info.dir) if f.endswith(".png")]
        assert len(pngs) == cfg.sample.per_class == info.count, name
        assert os.path.isfile(info.grid)


def test_mlflow_parent_and_stage_runs(pipeline_run):
    cfg, first, _ = pipeline_run
    client = MlflowClient(tracking_uri="sqlite:///" + os.path.join(cfg.output_dir, "mlflow.db"))
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`vqpipe.kind` = 'pipeline'"
    )
    parents = {r.info.run_name: r for r in runs}
    assert {"first", "second"} <= set(parents)
    children = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parents['first'].info.run_id}'",
    )
    by_stage = {r.data.tags["vqpipe.stage"]: r for r in children}
    assert set(by_stage) == set(stage_names())
    for stage, run in by_stage.items():
        assert run.info.status == "FINISHED", stage
        assert run.info.run_id == first[stage].manifest.mlflow_run_id
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "manifest.json" in artifacts, stage
    vq = by_stage["train_vqvae"]
    assert "train_vqvae.steps" in vq.data.params
    assert any(k.startswith("validation/") for k in vq.data.metrics)
    history = client.get_metric_history(vq.info.run_id, "train/loss")
    assert len(history) >= 2 and history[-1].step > history[0].step
    prior_metrics = by_stage["train_prior"].data.metrics
    assert any("bits_per_code" in k for k in prior_metrics)
    assert by_stage["evaluate"].data.metrics


def test_report_shows_training_curves_and_code_usage(pipeline_run):
    cfg, first, _ = pipeline_run
    report = first["evaluate"].manifest.report
    folder = os.path.dirname(report)
    linked = [
        line.split("](")[1].rstrip(")")
        for line in open(report).read().splitlines()
        if line.startswith("![")
    ]
    expected = {
        "figures/curves-autoencoder-loss.png",
        "figures/curves-autoencoder-codebooks.png",
        "figures/curves-priors.png",
        "figures/code-usage.png",
        "figures/reconstructions.png",
    }
    assert expected <= set(linked)
    for path in linked:
        assert os.path.getsize(os.path.join(folder, path)) > 1000, path
    client = MlflowClient(tracking_uri="sqlite:///" + os.path.join(cfg.output_dir, "mlflow.db"))
    logged = {
        a.path
        for a in client.list_artifacts(first["evaluate"].manifest.mlflow_run_id, "report/figures")
    }
    assert {f"report/{name}" for name in expected} <= logged


def test_registered_tokenizer_gives_the_shards_codes(pipeline_run):
    import mlflow

    from pipelines.data.corpus import open_corpus
    from pipelines.data.shards import iter_code_samples

    cfg, first, _ = pipeline_run
    vq = first["train_vqvae"].manifest
    assert vq.registered_model == "models:/e2e-tokenizer/1"
    priors = first["train_prior"].manifest.priors
    assert priors["top"].registered_model == "models:/e2e-prior-top/1"
    assert priors["bottom"].registered_model == "models:/e2e-prior-bottom/1"

    mlflow.set_tracking_uri("sqlite:///" + os.path.join(cfg.output_dir, "mlflow.db"))
    tokenizer = mlflow.pyfunc.load_model(vq.registered_model)
    rows = open_corpus(cfg.data).dataset("all").take(8)
    codes = tokenizer.predict(np.stack([r["image"] for r in rows]))
    shards = first["tokenize"].manifest.shards
    stored = {s["key"]: s for s in iter_code_samples([shard.uri for shard in shards])}
    for i, row in enumerate(rows):
        for level in ("top", "bottom"):
            np.testing.assert_array_equal(codes[level][i], stored[row["key"]][level])


def test_second_run_skips_every_stage(pipeline_run):
    cfg, first, second = pipeline_run
    for stage in stage_names():
        assert second[stage].manifest == first[stage].manifest, f"{stage} ran again"
        assert second[stage].skipped and not first[stage].skipped
    client = MlflowClient(tracking_uri="sqlite:///" + os.path.join(cfg.output_dir, "mlflow.db"))
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    parent = client.search_runs(
        [experiment.experiment_id], filter_string="attributes.run_name = 'second'"
    )[0]
    children = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    assert children == []
    assert all(parent.data.tags[f"vqpipe.{s}"] == "skipped" for s in stage_names())


def test_status_says_what_is_done_and_what_changed(pipeline_run, tmp_path, capsys):
    import yaml

    from pipelines.status import pipeline_status

    cfg, _, _ = pipeline_run
    assert [(s.stage, s.state) for s in pipeline_status(cfg)] == [
        (name, "done") for name in stage_names()
    ]
    changed = cfg.model_copy(deep=True)
    changed.train_prior.top.lr = 1e-4
    states = {s.stage: s for s in pipeline_status(changed)}
    assert states["train_prior"].state == "stale"
    assert states["train_prior"].detail == "changed: config.train_prior"
    assert states["sample"].state == "stale" and "train_prior" in states["sample"].detail
    assert states["tokenize"].state == "done"

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert cli_main(["status", str(config), "--set", "sample.temperature=0.5"]) == 0
    out = capsys.readouterr().out
    assert "sample" in out and "changed: config.sample" in out


def test_changed_sample_config_reruns_only_sample_and_evaluate(pipeline_run, shared_run):
    cfg, first, _ = pipeline_run
    changed = cfg.model_copy(deep=True)
    changed.sample.temperature = 0.5
    with restored(shared_run, ["sample", "evaluate"]):
        third = run_stages(changed, run_name="third")
    for stage in ("train_vqvae", "tokenize", "train_prior"):
        assert third[stage].manifest.mlflow_run_id == first[stage].manifest.mlflow_run_id
    for stage in ("sample", "evaluate"):
        assert third[stage].manifest.mlflow_run_id != first[stage].manifest.mlflow_run_id


def test_cli_reports_config_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        json.dumps(
            {"output_dir": str(tmp_path), "data": {"source": "x"}, "tokenize": {"shards": 3}}
        )
    )
    assert cli_main(["tokenize", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "tokenize.shards: unknown key" in err


def test_cli_stage_needs_its_upstream(tmp_path, capsys, ray_local):
    corpus = tmp_path / "corpus" / "a"
    corpus.mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (16, 16)).save(corpus / "x.png")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        json.dumps({"output_dir": str(tmp_path / "out"), "data": {"source": str(corpus.parent)}})
    )
    assert cli_main(["train-prior", str(cfg)]) == 2
    assert "run `vqpipe tokenize` first" in capsys.readouterr().err
