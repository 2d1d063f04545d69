"""Stage 5: measure what the pipeline produced, and write a one-page report.

Every figure here comes from the test split (``data.test_fraction`` of the keys, by key hash),
which nothing upstream selects on: the validation split picks checkpoints in the training stages,
so figures measured on it would be optimistic. Each subset below is a fixed key-hash subset
(``smallest_by_key_hash``), class-blind and the same in every run. On the test split:

- reconstruction: mean squared error of decode(encode(x)) on images in [-1, 1] (reconstructions
  clipped to [-1, 1], as when they are saved), and PSNR on the [0, 1] scale, i.e.
  10 log10(1 / (MSE / 4)) dB, over the first ``holdout_batches`` batches;
- codebooks: usage (fraction of the K codes that occur) and perplexity (exp of the entropy of the
  code histogram) per level, over every test code in the tokenize stage's shards, not per batch;
- priors: negative log-likelihood of the test code maps in bits per code, beside log2(K), the
  cost of a uniform guess.

On the sample stage's images, the Classification Accuracy Score (CAS, Ravuri & Vinyals 2019): a
classifier trained only on generated images, tested on real test images, beside the same
classifier trained for the same steps on as many real train images as there are generated ones,
class by class (``pipelines.evaluation.cas``), with bootstrap 95% intervals over the test images and
per-class accuracies. A judge, a classifier trained on real train images with its own seed (never
the classifier that rejection sampling picked the samples with), scores the samples
(``cas/real_to_generated``); its penultimate layer is the feature space of a Fréchet distance to
the real test images and of the samples' precision and recall (``pipelines.evaluation.feature_space``).
With ``evaluate.seeds`` > 1, sampling and CAS are repeated with further sampling seeds and the
figures are means, with their standard deviation and range across seeds. Accuracies are among
the sampled classes only, so sampling a subset of classes is still a fair comparison. Every
prediction behind the CAS figures (each classifier's class per image) is written to
``predictions.parquet`` and logged to the stage's MLflow run, so they can be checked or sliced.

An unlabelled corpus (no classes, unconditional priors) has no CAS, which needs labels; the
manifest's ``cas_skipped`` and the report say so. Its samples get the feature-space figures alone,
in the features of a fixed, randomly initialised network that nothing trained
(``pipelines.evaluation.classifier.RandomFeatures``). Reconstruction, codebooks and bits per code
need no labels and are measured as for any corpus.

This module only runs the steps; the figures are computed in ``pipelines.evaluation.metrics``
and the report's sections written in ``pipelines.evaluation.sections``.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import time

import numpy as np
import torch

from pipelines.data import storage
from pipelines.data.corpus import open_corpus
from pipelines.data.shards import check_shard_files, code_dataset, relabel_codes
from pipelines.evaluation.classifier import labelled_images
from pipelines.evaluation.figures import (
    autoencoder_curves,
    metric_history,
    prior_curves,
    training_curves_figure,
)
from pipelines.evaluation.metrics import (
    SampleScores,
    classification_metrics,
    code_metrics,
    reconstruction_metrics,
    unlabelled_metrics,
)
from pipelines.evaluation.report import Figure, Report, write_report
from pipelines.evaluation.sections import Figures, build_report
from pipelines.evaluation.upstream import Upstream
from pipelines.generation import REJECTION_CLASSIFIER, draw_samples, prior_order
from pipelines.manifest import require_manifest
from pipelines.stage import StageContext, StageSpec, ensure_ray
from pipelines.stage_manifests import (
    EvaluateManifest,
    SampleManifest,
    TokenizeManifest,
    TrainPriorManifest,
    TrainVQVAEManifest,
)
from pipelines.tokenizer import read_identified, tracking_uri_for
from vq_core.checkpoint import load_checkpoint

log = logging.getLogger("vqpipe")

PREDICTIONS = "predictions.parquet"  # per image, each CAS classifier's prediction


def run(ctx: StageContext) -> EvaluateManifest:
    up = Upstream.read(ctx.cfg.output_dir)
    ensure_ray(ctx.cfg)
    started = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    notes: list[str] = []
    metrics: dict[str, float] = {}

    recon_grid = _reconstruction(ctx, _load_tokenizer(ctx, up, device), metrics, notes)
    counts = _codes_and_priors(ctx, up, device, metrics)
    scores = _samples(ctx, up)
    if scores.note:
        log.info("evaluate: no CAS: %s", scores.note)
    metrics.update(scores.metrics)
    metrics["evaluate/seconds"] = time.time() - started
    metrics = {k: float(v) for k, v in metrics.items()}
    ctx.tracking.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})

    figures = Figures(recon_grid, counts, _training_curves(ctx, up, metrics))
    report = build_report(up, ctx.cfg.evaluate, metrics, figures, scores, notes)
    uris = _publish(ctx, report)
    predictions = _write_predictions(ctx, scores)
    return EvaluateManifest(
        metrics=metrics,
        report=uris["markdown"],
        report_html=uris["html"],
        levels=up.tok.levels,
        cas_skipped=scores.note,
        judge_seed=scores.judge.seed if scores.judge else None,
        feature_network=scores.features,
        predictions=predictions,
    )


def _load(uri: str, device: torch.device) -> torch.nn.Module:
    return load_checkpoint(storage.read_bytes(uri), map_location=device)[0]


def _load_tokenizer(ctx: StageContext, up: Upstream, device: torch.device) -> torch.nn.Module:
    """The autoencoder the corpus was tokenized with (trained here or pinned)."""
    data = read_identified(up.tok.tokenizer, tracking_uri_for(ctx.cfg))
    return load_checkpoint(data, map_location=device)[0]


def _reconstruction(
    ctx: StageContext, autoencoder: torch.nn.Module, metrics: dict[str, float], notes: list[str]
) -> np.ndarray | None:
    """Add the test reconstruction metrics; return the reconstruction grid (None if empty)."""
    cfg = ctx.cfg.evaluate
    log.info("evaluate: reconstruction on the test split")
    holdout_ds = open_corpus(ctx.cfg.data).dataset("test")
    holdout = labelled_images(holdout_ds, cfg.holdout_batches * cfg.batch_size)
    if not len(holdout):
        notes.append("The test split is empty (data.test_fraction = 0): no reconstruction metrics.")
        return None
    recon, grid = reconstruction_metrics(autoencoder, holdout, cfg.batch_size, cfg.grid_images)
    metrics.update(recon)
    return grid


def _codes_and_priors(
    ctx: StageContext, up: Upstream, device: torch.device, metrics: dict[str, float]
) -> dict[str, np.ndarray]:
    """Add codebook usage per level and each prior's bits per code, on the test split; return
    each level's code histogram."""
    cfg = ctx.cfg.evaluate
    log.info("evaluate: codebooks and priors on the test split of the code shards")
    priors = {
        level: (_load(entry.checkpoint, device), entry.condition)
        for level, entry in up.priors.priors.items()
    }
    codes = code_dataset(up.tok, split="test")
    labels = up.prior_labels()
    if labels is not None:  # the priors trained on several corpora, classes merged by name
        codes = codes.map_batches(relabel_codes, batch_format="numpy", fn_kwargs={"labels": labels})
    # Which maps fall in the first holdout_batches batches must not depend on scheduling.
    codes.context.execution_options.preserve_order = True
    code_stats, counts = code_metrics(
        codes, up.tok.levels, up.tok.codebook_sizes, priors, cfg.batch_size, cfg.holdout_batches
    )
    metrics.update(code_stats)
    if metrics["test/code_maps"]:
        metrics["test/bits_per_image"] = sum(
            metrics[f"test/bits_per_code/{level}"] * math.prod(up.tok.code_shapes[level])
            for level in priors
        )
    return counts


def _samples(ctx: StageContext, up: Upstream) -> SampleScores:
    """CAS and the feature-space figures of the samples, over every sampling seed."""
    if up.sample is None:
        return SampleScores({}, "the sample stage has not run")
    shape = (*up.tok.image_size, up.tok.channels)
    if not up.tok.labelled:
        log.info("evaluate: feature-space quality (the corpus has no labels: no CAS)")
        return unlabelled_metrics(ctx.cfg, sample_sets(ctx, up), shape)
    log.info("evaluate: Classification Accuracy Score and feature-space quality")
    return classification_metrics(
        ctx.cfg,
        ctx.stage_dir,
        up.tok.class_names,
        sample_sets(ctx, up),
        shape,
        rejection_seed(up.sample),
    )


def sample_sets(ctx: StageContext, up: Upstream) -> list[tuple[int, dict[str, str]]]:
    """(seed, class name -> folder of PNGs) of every sampling seed: the sample stage's own
    images, then ``evaluate.seeds - 1`` more sets drawn here with the sample stage's settings."""

    first_seed = ctx.cfg.sample.seed
    sets = [(first_seed, {name: entry.dir for name, entry in up.sample.classes.items()})]
    rejection_uri = None
    if up.sample.settings.rejection.get("enabled"):
        uri = storage.join(SampleManifest.directory(ctx.cfg.output_dir), REJECTION_CLASSIFIER)
        rejection_uri = uri if storage.exists(uri) else None
    for offset in range(1, ctx.cfg.evaluate.seeds):
        seed = first_seed + offset
        where = dataclasses.replace(ctx, stage_dir=storage.join(ctx.stage_dir, f"samples-{seed}"))
        entries = draw_samples(
            where,
            up.priors,
            prior_order(up.priors),
            list(up.sample.classes),
            seed,
            up.sample.settings.draws_per_class,
            rejection_uri,
        )
        sets.append((seed, {name: entry.dir for name, entry in entries.items()}))
    return sets


def rejection_seed(sample: SampleManifest | None) -> int | None:
    """The seed of the classifier that picked the samples, when rejection was on."""
    if sample is None or not sample.settings.rejection.get("enabled"):
        return None
    return sample.settings.seed


def _training_curves(ctx: StageContext, up: Upstream, metrics: dict[str, float]) -> list[Figure]:
    """The training stages' curves, read back from their MLflow runs (none without tracking)."""
    if not ctx.tracking.tracking_uri:
        return []
    client = ctx.tracking.client()
    wanted = [(up.vq.mlflow_run_id, autoencoder_curves(up.vq.levels))] if up.vq else []
    wanted.append((up.priors.mlflow_run_id, prior_curves(up.priors.levels)))
    figures = []
    for run_id, specs in wanted:
        if run_id is None:
            continue
        for spec in specs:
            histories = metric_history(client, run_id, spec.keys)
            # The test split's score, measured here once, drawn beside the training curves.
            for key in spec.keys:
                if key in metrics and not histories.get(key):
                    histories[key] = [(0, metrics[key])]
            png = training_curves_figure(histories, spec.title, spec.panels)
            if png is not None:
                figures.append(Figure(spec.caption, spec.filename, png))
    return figures


def _publish(ctx: StageContext, report: Report) -> dict[str, str]:
    """Write the report and log it, with its figures, to the stage's MLflow run."""
    uris = write_report(report, ctx.stage_dir)
    for uri in uris.values():
        ctx.tracking.log_bytes(storage.read_bytes(uri), f"report/{uri.rsplit('/', 1)[-1]}")
    for section in report.sections:
        for figure in section.figures:
            ctx.tracking.log_bytes(figure.png, f"report/{figure.filename}")
    return uris


def _write_predictions(ctx: StageContext, scores: SampleScores) -> str | None:
    """Write every classifier prediction behind the CAS figures (``PREDICTIONS``, a Parquet
    table: ``pipelines.evaluation.metrics.prediction_table``) and log it; its URI, or None when
    CAS did not run."""
    if scores.predictions is None:
        return None
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(scores.predictions, buffer)
    uri = storage.join(ctx.stage_dir, PREDICTIONS)
    storage.write_bytes(uri, buffer.getvalue())
    ctx.tracking.log_bytes(buffer.getvalue(), PREDICTIONS)
    return uri


def _check_inputs(cfg) -> None:
    """The test codes are as tokenize wrote them, and so is the autoencoder that made them."""
    tok = require_manifest(cfg.output_dir, TokenizeManifest)
    check_shard_files(tok)
    read_identified(tok.tokenizer, tracking_uri_for(cfg))


SPEC = StageSpec(
    manifest=EvaluateManifest,
    run=run,
    description="measure reconstructions, codebooks, priors and samples; write the report",
    upstream=(TrainVQVAEManifest, TokenizeManifest, TrainPriorManifest, SampleManifest),
    upstream_for=lambda cfg: (
        (TokenizeManifest, TrainPriorManifest, SampleManifest)
        if cfg.tokenize.checkpoint
        else (TrainVQVAEManifest, TokenizeManifest, TrainPriorManifest, SampleManifest)
    ),
    # sample: evaluate.seeds > 1 draws more samples with the sample stage's settings.
    sections=("seed", "data", "sample"),
    reads_corpus=True,
    enabled=lambda cfg: cfg.evaluate.enabled,
    check_inputs=_check_inputs,
)
