"""The evaluate stage, run on tiny untrained upstream models: its metrics, report and judge."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from pipelines.config import parse_config
from pipelines.data import storage
from pipelines.data.demo_data import generate_corpus
from pipelines.data.images import to_model_input
from pipelines.data.keys import split_of
from pipelines.data.shards import iter_code_samples, write_shard
from pipelines.evaluation.classifier import load_classifier
from pipelines.evaluation.metrics import JUDGE
from pipelines.manifest import require_manifest, write_manifest
from pipelines.stage import StageContext
from pipelines.stage_manifests import (
    BadInputs,
    SampleManifest,
    TokenizeManifest,
    TrainVQVAEManifest,
)
from pipelines.stages import evaluate, sample
from pipelines.tokenizer import TokenizerIdentity, sha256_of
from pipelines.tracking import Tracker
from tests.pipelines import independent as ind
from tests.pipelines.conftest import tiny_raw_config
from tests.pipelines.stages.test_sample import CLASSES, make_context, write_upstream
from vq_core.checkpoint import load_checkpoint


def read_folder_corpus(root: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(keys, uint8 images N x H x W x 3, labels) of a demo corpus, keyed as pipelines.data.corpus keys it."""
    keys, images, labels = [], [], []
    for label, name in enumerate(CLASSES):
        for f in sorted(os.listdir(os.path.join(root, name))):
            if f.endswith(".png"):
                keys.append(f"{name}/{f[: -len('.png')]}")
                images.append(np.asarray(Image.open(os.path.join(root, name, f)).convert("RGB")))
                labels.append(label)
    return keys, np.stack(images), np.array(labels)


def write_tokenize(cfg) -> TokenizeManifest:
    """Code shards of the whole corpus made with the untrained upstream autoencoder."""
    vq = require_manifest(cfg.output_dir, TrainVQVAEManifest)
    model, _ = load_checkpoint(vq.checkpoint)
    keys, images, labels = read_folder_corpus(cfg.data.source)
    codes = model.encode(to_model_input(images))
    arrays = {level: c.numpy().astype(np.uint8) for level, c in zip(vq.levels, codes)}
    tok_dir = storage.join(cfg.output_dir, "tokenize")
    half = len(keys) // 2  # two shards, so the reader crosses a shard boundary
    shards = [
        write_shard(tok_dir, keys[s], labels[s], {k: v[s] for k, v in arrays.items()})
        for s in (slice(0, half), slice(half, None))
    ]
    fractions = (cfg.data.validation_fraction, cfg.data.test_fraction)
    counts = {s: sum(split_of(k, *fractions) == s for k in keys) for s in ("validation", "test")}
    return write_manifest(
        cfg.output_dir,
        TokenizeManifest(
            shards=shards,
            samples=len(keys),
            splits={"train": len(keys) - sum(counts.values()), **counts},
            levels=vq.levels,
            code_shapes=vq.code_shapes,
            code_dtypes={level: "uint8" for level in vq.levels},
            codebook_sizes=vq.codebook_sizes,
            class_names=CLASSES,
            checkpoint=vq.checkpoint,
            tokenizer=TokenizerIdentity(
                checkpoint=vq.checkpoint, sha256=sha256_of(storage.read_bytes(vq.checkpoint))
            ),
            corpus_name="shapes",
            validation_fraction=fractions[0],
            test_fraction=fractions[1],
            image_size=vq.image_size,
            channels=vq.channels,
            bad_inputs=BadInputs(count=0, keys=[], table=""),
            metrics={},
        ),
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("corpus") / "shapes")
    generate_corpus(root, classes=CLASSES, images_per_class=12, image_size=16, seed=2)
    return root


@pytest.fixture(scope="module")
def evaluated(ray_local, corpus, tmp_path_factory):
    """Every upstream stage faked with untrained tiny models, then the real evaluate stage."""
    root = tmp_path_factory.mktemp("evaluate")
    # Rejection on: the judge must be trained apart from the classifier that picked the samples.
    cfg = parse_config(
        tiny_raw_config(str(root / "out"), corpus),
        [
            "sample.per_class=3",
            "sample.batch_size=6",
            "sample.rejection.enabled=true",
            "sample.rejection.classifier_steps=5",
        ],
    )
    write_upstream(cfg)
    tok = write_tokenize(cfg)
    write_manifest(cfg.output_dir, sample.run(make_context(cfg)))

    tracker = Tracker("sqlite:///" + str(root / "mlflow.db"), "test-evaluate")
    with tracker.stage_run("evaluate") as tracking:
        ctx = StageContext(
            cfg, "evaluate", storage.join(cfg.output_dir, "evaluate"), "test", tracking
        )
        manifest = evaluate.run(ctx)
    return cfg, tok, manifest, tracker, tracking.run_id


EXPECTED_METRICS = [
    "test/mse",
    "test/psnr",
    "test/perplexity/top",
    "test/perplexity/bottom",
    "test/usage/top",
    "test/usage/bottom",
    "test/bits_per_code/top",
    "test/bits_per_code/bottom",
    "test/bits_per_image",
    "cas/generated_to_real",
    "cas/real_to_real",
    "cas/real_to_generated",
    "cas/judge_on_real",
    "cas/generated_to_real/ci_low",
    "cas/generated_to_real/ci_high",
    "cas/real_to_real/ci_low",
    "quality/fid",
    "quality/fid_real_train",
    "quality/precision",
    "quality/recall",
]


def test_every_metric_present_and_finite(evaluated):
    cfg, _, manifest, _, _ = evaluated
    metrics = manifest.metrics
    for name in EXPECTED_METRICS:
        assert name in metrics, name
        assert math.isfinite(metrics[name]), (name, metrics[name])
    assert metrics["test/psnr"] == pytest.approx(10 * math.log10(4 / metrics["test/mse"]))
    # Each accuracy is the share of right predictions in evaluate's predictions table, recomputed.
    table = ind.predictions(manifest.predictions)
    recomputed = ind.cas_figures(table, CLASSES, cfg.evaluate.bootstrap_samples)
    for name in (
        "cas/generated_to_real",
        "cas/real_to_real",
        "cas/real_to_generated",
        "cas/judge_on_real",
    ):
        assert metrics[name] == pytest.approx(recomputed[name], abs=1e-12), name
    assert metrics["cas/generated_images"] == 3 * len(CLASSES)


def test_untrained_priors_cost_about_log2_k_bits(evaluated):
    _, _, manifest, _, _ = evaluated
    for level in ("top", "bottom"):
        # Near-uniform logits: close to log2(16) = 4 bits, far from 4 nats (5.8 bits) or 4 * h * w.
        assert 3.0 < manifest.metrics[f"test/bits_per_code/{level}"] < 5.0


def test_codebook_stats_cover_every_held_out_code(evaluated):
    cfg, tok, manifest, _, _ = evaluated
    counts = {level: np.zeros(16, dtype=np.int64) for level in ("top", "bottom")}
    maps = 0
    for s in iter_code_samples([shard.uri for shard in tok.shards]):
        if split_of(s["key"], cfg.data.validation_fraction, cfg.data.test_fraction) == "test":
            maps += 1
            for level in counts:
                counts[level] += np.bincount(np.asarray(s[level]).ravel(), minlength=16)
    assert manifest.metrics["test/code_maps"] == maps == tok.splits["test"]
    for level, c in counts.items():
        p = c[c > 0] / c.sum()
        assert manifest.metrics[f"test/perplexity/{level}"] == pytest.approx(
            np.exp(-(p * np.log(p)).sum())
        )
        assert manifest.metrics[f"test/usage/{level}"] == pytest.approx((c > 0).sum() / 16)


def test_report_files_mention_the_metrics(evaluated):
    _, _, manifest, _, _ = evaluated
    markdown = open(manifest.report).read()
    html = open(manifest.report_html).read()
    for text in (markdown, html):
        for name in ("test/psnr", "cas/generated_to_real", "log2 K", "bits/code"):
            assert name in text, name
        assert f"{manifest.metrics['test/mse']:.4g}" in text
    # Reconstructions, code usage and the class grids; no curves: the upstream runs were not tracked.
    assert html.count("data:image/png;base64,") == 2 + len(CLASSES)
    assert "figures/code-usage.png" in markdown and "No training runs were tracked" in markdown
    folder = os.path.dirname(manifest.report)
    for line in markdown.splitlines():
        if line.startswith("!["):
            assert os.path.isfile(os.path.join(folder, line.split("](")[1].rstrip(")"))), line


def test_mlflow_run_has_metrics_and_report(evaluated):
    _, _, manifest, tracker, run_id = evaluated
    client = MlflowClient(tracker.tracking_uri)
    logged = client.get_run(run_id).data.metrics
    for name in EXPECTED_METRICS:
        assert logged[name] == pytest.approx(manifest.metrics[name]), name
    artifacts = {a.path for a in client.list_artifacts(run_id, "report")}
    assert {"report/report.md", "report/report.html"} <= artifacts


def test_reference_is_size_matched_and_intervals_contain_the_estimates(evaluated):
    _, _, manifest, _, _ = evaluated
    m = manifest.metrics
    assert m["cas/real_train_images"] == m["cas/generated_images"] == 3 * len(CLASSES)
    assert m["cas/real_test_images"] > 0 and m["cas/seeds"] == 1
    for name in ("generated_to_real", "real_to_real"):
        assert m[f"cas/{name}/ci_low"] <= m[f"cas/{name}"] <= m[f"cas/{name}/ci_high"], name
    # The ratio's interval is finite only when the reference is rarely at 0 (untrained models
    # here); when it is, it holds the ratio.
    if "cas/ratio/ci_low" in m:
        assert m["cas/ratio/ci_low"] <= m["cas/ratio"] <= m["cas/ratio/ci_high"]
    assert "cas/generated_to_real/std" not in m  # one seed: no spread to report


def test_per_class_accuracies_in_metrics_and_report(evaluated):
    cfg, tok, manifest, _, _ = evaluated
    m = manifest.metrics
    report = open(manifest.report).read()
    assert "## CAS per class" in report
    test_labels = [
        s["label"]
        for s in iter_code_samples([shard.uri for shard in tok.shards])
        if split_of(s["key"], cfg.data.validation_fraction, cfg.data.test_fraction) == "test"
    ]
    recomputed = ind.cas_figures(
        ind.predictions(manifest.predictions), CLASSES, cfg.evaluate.bootstrap_samples
    )
    for label in sorted(set(test_labels)):
        for name in ("generated_to_real", "real_to_real"):
            key = f"cas/{name}/class/{CLASSES[label]}"
            assert m[key] == pytest.approx(recomputed[key], abs=1e-12), key
        assert f"| {CLASSES[label]} |" in report
    # The test images are weighted alike: the overall accuracy is the class-size-weighted mean.
    counts = np.bincount(test_labels, minlength=len(CLASSES))
    weighted = (
        sum(
            counts[c] * m[f"cas/real_to_real/class/{CLASSES[c]}"]
            for c in range(len(CLASSES))
            if counts[c]
        )
        / counts.sum()
    )
    assert weighted == pytest.approx(m["cas/real_to_real"])


def test_judge_is_trained_apart_from_the_rejection_classifier(evaluated):
    cfg, _, manifest, _, _ = evaluated
    rejection, _ = load_classifier(
        os.path.join(storage.join(cfg.output_dir, "sample"), "classifier.pt")
    )
    judge, _ = load_classifier(os.path.join(storage.join(cfg.output_dir, "evaluate"), JUDGE))
    assert manifest.judge_seed is not None and manifest.judge_seed != cfg.sample.seed
    differs = [
        not torch.equal(a, b)
        for a, b in zip(rejection.state_dict().values(), judge.state_dict().values())
        if a.is_floating_point()
    ]
    assert all(differs)


def test_report_names_the_feature_network(evaluated):
    _, _, manifest, _, _ = evaluated
    report = open(manifest.report).read()
    assert "## Sample quality in feature space" in report
    assert manifest.feature_network in report
    for text in ("ImageClassifier", "5 conv3x3", "64 features", "real images of the train split"):
        assert text in manifest.feature_network, text
    assert f"for {5} Adam steps" in manifest.feature_network  # evaluate.classifier_steps


def test_several_seeds_give_mean_and_spread(evaluated, tmp_path):
    cfg, _, first, _, _ = evaluated
    twice = cfg.model_copy(deep=True)
    twice.evaluate.seeds = 2
    ctx = StageContext(
        twice, "evaluate", str(tmp_path / "evaluate"), "test", make_context(cfg).tracking
    )
    manifest = evaluate.run(ctx)
    m = manifest.metrics
    assert m["cas/seeds"] == 2
    # The second seed's samples were drawn here, as many as the sample stage drew.
    extra = tmp_path / "evaluate" / f"samples-{cfg.sample.seed + 1}"
    first_set = require_manifest(cfg.output_dir, SampleManifest).classes
    for name in CLASSES:
        pngs = sorted(f for f in os.listdir(extra / name) if f.endswith(".png"))
        assert len(pngs) == 3, name
        # Another seed draws other samples, not the sample stage's set again.
        drawn = np.stack([np.asarray(Image.open(extra / name / f)) for f in pngs])
        before = sorted(f for f in os.listdir(first_set[name].dir) if f.endswith(".png"))
        earlier = np.stack(
            [np.asarray(Image.open(os.path.join(first_set[name].dir, f))) for f in before]
        )
        assert not np.array_equal(drawn, earlier), name
    for name in ("cas/generated_to_real", "cas/real_to_real", "quality/fid"):
        assert m[f"{name}/min"] <= m[name] <= m[f"{name}/max"], name
        # Two seeds: the mean lies halfway between them, and the sample standard deviation
        # (ddof 1) of two values is their distance over sqrt 2.
        assert m[name] == pytest.approx((m[f"{name}/min"] + m[f"{name}/max"]) / 2), name
        assert m[f"{name}/std"] == pytest.approx(
            (m[f"{name}/max"] - m[f"{name}/min"]) / math.sqrt(2)
        ), name
    # The first seed's figures are the one-seed run's; the mean moves with the second seed.
    assert m["cas/generated_to_real/min"] <= first.metrics["cas/generated_to_real"]
    assert first.metrics["cas/generated_to_real"] <= m["cas/generated_to_real/max"]
    assert "spread column" in open(manifest.report).read()
