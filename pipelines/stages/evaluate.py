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
classifier trained only on generated images, tested on real test images, reported beside the
same classifier trained on real train images for the same number of steps, and beside that real
classifier's accuracy on the generated images (does each sample look like its class?). Accuracies
are among the sampled classes only, so sampling a subset of classes is still a fair comparison.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from pipelines import storage
from pipelines.classifier import (
    ClassifierConfig,
    LabelledImages,
    accuracy,
    corpus_classifier,
    labelled_images,
    resize_images,
    train_classifier,
)
from pipelines.errors import InputError
from pipelines.manifest import StageManifest, format_metrics, read_manifest, require_manifest
from pipelines.report import Figure, Report, Section, Table, write_report
from pipelines.stage import StageContext, StageSpec, ensure_ray
from pipelines.stages.sample import REJECTION_CLASSIFIER, SampleManifest
from pipelines.stages.tokenize import TokenizeManifest
from pipelines.stages.train_prior import TrainPriorManifest
from pipelines.stages.train_vqvae import TrainVQVAEManifest
from pipelines.tokenizer import read_identified, tracking_uri_for
from vq_core.quantizer import code_histogram_stats

log = logging.getLogger("vqpipe")


class EvaluateManifest(StageManifest):
    """The pipeline's figures and where its report is."""

    stage: ClassVar[str] = "evaluate"

    metrics: dict[str, float]
    report: str
    report_html: str
    levels: list[str]
    cas_skipped: str | None  # why CAS was not computed, when it was not

    def summary(self) -> str:
        shown = (
            "test/psnr",
            "cas/generated_to_real",
            "cas/real_to_generated",
            "cas/real_to_real",
        )
        return format_metrics(self.metrics, shown)


@dataclass(frozen=True)
class Upstream:
    """The manifests the evaluation reads; ``sample`` is None when that stage has not run, ``vq``
    when the tokenizer was pinned rather than trained here."""

    vq: TrainVQVAEManifest | None
    tok: TokenizeManifest
    priors: TrainPriorManifest
    sample: SampleManifest | None

    @classmethod
    def read(cls, output_dir: str) -> Upstream:
        tok = require_manifest(output_dir, TokenizeManifest)
        priors = require_manifest(output_dir, TrainPriorManifest)
        if priors.tokenizer.sha256 != tok.tokenizer.sha256:
            raise InputError(
                f"the priors model codes of the tokenizer {priors.tokenizer.describe()}, but this "
                f"run's corpus was tokenized with {tok.tokenizer.describe()}; their bits per code "
                "on it would mean nothing"
            )
        vq = read_manifest(output_dir, TrainVQVAEManifest)
        if vq is not None and vq.checkpoint != tok.tokenizer.checkpoint:
            vq = None  # a pinned tokenizer: this output_dir's train_vqvae is not the one used
        return cls(
            vq=vq,
            tok=tok,
            priors=priors,
            sample=read_manifest(output_dir, SampleManifest),
        )

    def prior_labels(self) -> np.ndarray | None:
        """The priors' label of each of the corpus' labels (None when they are the same)."""
        names = self.priors.class_names
        missing = [n for n in self.tok.class_names if n not in names]
        if missing:
            raise InputError(
                f"the priors know no class {missing} of this corpus (their classes: {names})"
            )
        labels = [names.index(n) for n in self.tok.class_names]
        return None if labels == list(range(len(labels))) else np.asarray(labels, np.int64)


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB on the [0, 1] scale of an MSE measured on [-1, 1] images (which is 4x larger)."""
    # Floor: a perfect reconstruction reads as 100 dB rather than infinity.
    return 10.0 * math.log10(4.0 / max(mse, 4e-10))


def histogram_stats(counts: np.ndarray) -> tuple[float, float, int]:
    """(perplexity, usage, codes used) of a code histogram of length K; no perplexity when empty."""
    if counts.sum() == 0:
        return math.nan, 0.0, 0
    perplexity, usage = code_histogram_stats(torch.from_numpy(counts))
    return float(perplexity), float(usage), int((counts > 0).sum())


@torch.inference_mode()
def reconstruction_metrics(
    autoencoder: torch.nn.Module, holdout: LabelledImages, batch_size: int, grid_images: int
) -> tuple[dict[str, float], np.ndarray]:
    """Held-out MSE and PSNR, and a grid of originals (top row) over reconstructions (bottom)."""
    from pipelines.images import make_grid, to_uint8

    device = next(autoencoder.parameters()).device
    squared_error, values = 0.0, 0
    shown_in, shown_out = [], []
    for start in range(0, len(holdout), batch_size):
        x = holdout.images[start : start + batch_size].to(device)
        codes = autoencoder.encode(x)
        reconstruction = autoencoder.decode_codes(codes).float().clamp(-1, 1)
        squared_error += float(((reconstruction - x) ** 2).sum(dtype=torch.float64))
        values += x.numel()
        if sum(len(s) for s in shown_in) < grid_images:
            shown_in.append(x.cpu())
            shown_out.append(reconstruction.cpu())
    mse = squared_error / values
    n = min(grid_images, len(holdout))
    originals = to_uint8(torch.cat(shown_in)[:n])
    reconstructions = to_uint8(torch.cat(shown_out)[:n])
    grid = make_grid(np.concatenate([originals, reconstructions]), nrow=n)
    return {
        "test/mse": mse,
        "test/psnr": psnr_from_mse(mse),
        "test/images": len(holdout),
    }, grid


@torch.inference_mode()
def code_metrics(
    code_dataset: Any,
    levels: list[str],
    codebook_sizes: dict[str, int],
    priors: dict[str, tuple[torch.nn.Module, str | None]],
    batch_size: int,
    prior_batches: int,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Per level: usage and perplexity over every code map of the test split; each prior's bits per code
    over the first ``prior_batches`` batches. Also returns each level's code histogram."""
    counts = {level: np.zeros(codebook_sizes[level], dtype=np.int64) for level in levels}
    bits = {level: 0.0 for level in priors}
    maps_scored, maps_seen = 0, 0
    for batch_index, batch in enumerate(
        code_dataset.iter_batches(batch_size=batch_size, batch_format="numpy")
    ):
        codes = {level: np.asarray(batch[level]).astype(np.int64) for level in levels}
        for level in levels:
            counts[level] += np.bincount(codes[level].ravel(), minlength=codebook_sizes[level])
        n = len(batch["key"])
        maps_seen += n
        if batch_index >= prior_batches:
            continue
        labels = torch.as_tensor(np.asarray(batch["label"]).astype(np.int64))
        for level, (prior, condition) in priors.items():
            device = next(prior.parameters()).device
            loss = prior.loss(
                torch.from_numpy(codes[level]).to(device),
                labels=labels.to(device) if prior.config.num_classes > 0 else None,
                condition=torch.from_numpy(codes[condition]).to(device) if condition else None,
            )
            bits[level] += float(loss) * n  # every map has h*w codes: weight batches by maps
        maps_scored += n
    metrics: dict[str, float] = {"test/code_maps": maps_seen}
    for level in levels:
        perplexity, usage, used = histogram_stats(counts[level])
        metrics[f"test/perplexity/{level}"] = perplexity
        metrics[f"test/usage/{level}"] = usage
        metrics[f"test/codes_used/{level}"] = used
    for level in priors:
        metrics[f"test/bits_per_code/{level}"] = (
            bits[level] / maps_scored if maps_scored else math.nan
        )
    return metrics, counts


def generated_images(
    sample_dirs: dict[str, str], class_names: list[str], shape: tuple[int, int, int], size: int
) -> LabelledImages:
    """The sample stage's PNGs, labelled with their requested class, resized to ``size``."""
    from pipelines.images import decode_image, to_model_input

    images, labels, keys = [], [], []
    for name, directory in sample_dirs.items():
        files = [f for f in storage.list_files(directory, recursive=False) if f.endswith(".png")]
        if not files:
            continue
        pixels = np.stack([decode_image(storage.read_bytes(f), shape[:2], shape[2]) for f in files])
        images.append(resize_images(to_model_input(pixels), size))
        labels += [class_names.index(name)] * len(files)
        keys += files
    if not keys:
        return LabelledImages(torch.empty(0), torch.empty(0, dtype=torch.long), [])
    return LabelledImages(torch.cat(images), torch.tensor(labels, dtype=torch.long), keys)


def classification_metrics(
    ctx: StageContext,
    class_names: list[str],
    sample_dirs: dict[str, str],
    shape: tuple[int, int, int],
) -> tuple[dict[str, float], str | None]:
    """CAS and its two reference accuracies, from the generated images in ``sample_dirs`` (class
    name -> folder of PNGs); or no metrics and the reason they are missing."""
    from pipelines.corpus import open_corpus

    cfg = ctx.cfg.evaluate
    unknown = [n for n in sample_dirs if n not in class_names]
    if len(class_names) < 2 or unknown:
        return {}, "the samples are not labelled with the corpus' classes, so CAS does not apply"
    input_size = ClassifierConfig(num_classes=len(class_names), in_channels=shape[2]).input_size
    generated = generated_images(sample_dirs, class_names, shape, input_size)
    sampled = sorted(set(generated.labels.tolist()))
    if len(sampled) < 2:
        return {}, "fewer than 2 classes were sampled; a classifier needs at least 2"
    holdout = labelled_images(
        open_corpus(ctx.cfg.data).dataset("test"), cfg.max_images, size=input_size
    )
    holdout = holdout.subset(np.isin(holdout.labels.numpy(), sampled))
    if len(holdout) == 0:
        return {}, "the test split has no images of the sampled classes"

    log.info("evaluate: CAS classifier on %d generated images", len(generated))
    on_generated = train_classifier(
        generated.images,
        generated.labels,
        len(class_names),
        steps=cfg.classifier_steps,
        lr=cfg.classifier_lr,
        seed=ctx.cfg.seed,
    )
    # The rejection classifier of the sample stage is this very model when the settings agree.
    on_real = corpus_classifier(
        ctx.cfg.data,
        class_names,
        steps=cfg.classifier_steps,
        lr=cfg.classifier_lr,
        seed=ctx.cfg.seed,
        max_images=cfg.max_images,
        cache_uri=storage.join(ctx.stage_dir, "classifier-real.pt"),
        reuse_uris=(
            storage.join(SampleManifest.directory(ctx.cfg.output_dir), REJECTION_CLASSIFIER),
        ),
    )
    cas = accuracy(on_generated, holdout.images, holdout.labels, among=sampled)
    real = accuracy(on_real, holdout.images, holdout.labels, among=sampled)
    metrics = {
        "cas/generated_to_real": cas,
        "cas/real_to_real": real,
        "cas/real_to_generated": accuracy(
            on_real, generated.images, generated.labels, among=sampled
        ),
        "cas/ratio": cas / real if real > 0 else math.nan,
        "cas/generated_images": len(generated),
        "cas/real_test_images": len(holdout),
        "cas/classes": len(sampled),
    }
    return metrics, None


def _load(uri: str, device: torch.device) -> torch.nn.Module:
    from vq_core.checkpoint import load_checkpoint

    return load_checkpoint(storage.read_bytes(uri), map_location=device)[0]


def _load_tokenizer(ctx: StageContext, up: Upstream, device: torch.device) -> torch.nn.Module:
    """The autoencoder the corpus was tokenized with (trained here or pinned)."""
    from vq_core.checkpoint import load_checkpoint

    data = read_identified(up.tok.tokenizer, tracking_uri_for(ctx.cfg))
    return load_checkpoint(data, map_location=device)[0]


def _reconstruction(
    ctx: StageContext, autoencoder: torch.nn.Module, metrics: dict[str, float], notes: list[str]
) -> np.ndarray | None:
    """Add the test reconstruction metrics; return the reconstruction grid (None if empty)."""
    from pipelines.corpus import open_corpus

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
    from pipelines.shards import code_dataset, relabel_codes

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


@dataclass(frozen=True)
class Figures:
    """The pictures of the report: reconstructions, code histograms per level, training curves."""

    reconstructions: np.ndarray | None
    code_counts: dict[str, np.ndarray]
    curves: list[Figure]


def _training_curves(ctx: StageContext, up: Upstream, metrics: dict[str, float]) -> list[Figure]:
    """The training stages' curves, read back from their MLflow runs (none without tracking)."""
    from pipelines.figures import (
        autoencoder_curves,
        metric_history,
        prior_curves,
        training_curves_figure,
    )

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


def run(ctx: StageContext) -> EvaluateManifest:
    up = Upstream.read(ctx.cfg.output_dir)
    ensure_ray(ctx.cfg)
    started = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    notes: list[str] = []
    metrics: dict[str, float] = {}

    recon_grid = _reconstruction(ctx, _load_tokenizer(ctx, up, device), metrics, notes)
    counts = _codes_and_priors(ctx, up, device, metrics)
    cas_note = "the sample stage has not run"
    if up.sample is not None:
        log.info("evaluate: Classification Accuracy Score")
        shape = (*up.tok.image_size, up.tok.channels)
        dirs = {name: entry.dir for name, entry in up.sample.classes.items()}
        cas_metrics, cas_note = classification_metrics(ctx, up.tok.class_names, dirs, shape)
        metrics.update(cas_metrics)
    metrics["evaluate/seconds"] = time.time() - started
    metrics = {k: float(v) for k, v in metrics.items()}
    ctx.tracking.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})

    figures = Figures(recon_grid, counts, _training_curves(ctx, up, metrics))
    uris = _publish(ctx, build_report(ctx, up, metrics, figures, cas_note, notes))
    return EvaluateManifest(
        metrics=metrics,
        report=uris["markdown"],
        report_html=uris["html"],
        levels=up.tok.levels,
        cas_skipped=cas_note,
    )


# -------------------------------------------------------------------------------------------------
# The report


def _metric_table(metrics: dict[str, float], names: list[tuple[str, str]]) -> Table:
    return Table(
        ["metric", "value", "meaning"],
        [[k, metrics[k], meaning] for k, meaning in names if k in metrics],
    )


def _summary_section(up: Upstream, notes: list[str]) -> Section:
    vq, tok = up.vq, up.tok
    shapes = ", ".join(f"{level} {h}x{w}" for level, (h, w) in tok.code_shapes.items())
    splits = ", ".join(f"{split} {n}" for split, n in tok.splits.items())
    trained = (
        f"{vq.model} trained for {vq.steps} steps"
        if vq is not None
        else f"pinned tokenizer {tok.tokenizer.describe()}"
    )
    return Section(
        "Summary",
        [
            f"Autoencoder: {trained} on "
            f"{tok.image_size[0]}x{tok.image_size[1]} images with {tok.channels} channel(s); "
            f"code maps: {shapes}.",
            f"Corpus: {tok.samples} images tokenized ({splits}), classes: "
            f"{', '.join(tok.class_names) or 'none (unconditional)'}.",
            "Splits are by key hash (data.validation_fraction, data.test_fraction). The training "
            "stages select on the validation split (the best prior step, the held-out curves); "
            "every figure in this report is measured on the test split, which nothing selects "
            "on. The models were trained on the train split only; the CAS reference classifier "
            "too.",
            *notes,
        ],
    )


def _reconstruction_section(metrics: dict[str, float], recon_grid: np.ndarray | None) -> Section:
    from pipelines.images import encode_png

    section = Section(
        "Reconstruction (test split)",
        [
            "MSE is measured on images scaled to [-1, 1], with reconstructions clipped to that range. "
            "PSNR is on the [0, 1] scale: 10 log10(1 / (MSE / 4)) dB."
        ],
        _metric_table(
            metrics,
            [
                ("test/mse", "mean squared error, images in [-1, 1]"),
                ("test/psnr", "dB, [0, 1] scale"),
                ("test/images", "test images measured"),
            ],
        ),
    )
    if recon_grid is not None:
        section.figures.append(
            Figure(
                "Test images (top) and their reconstructions (bottom)",
                "figures/reconstructions.png",
                encode_png(recon_grid),
            )
        )
    return section


def _codebook_section(
    up: Upstream, metrics: dict[str, float], counts: dict[str, np.ndarray]
) -> Section:
    from pipelines.figures import code_usage_figure

    section = Section(
        "Codebooks",
        [
            "Over every code map of the test split "
            f"({int(metrics.get('test/code_maps', 0))} maps). Usage is the fraction of codes that "
            "occur; perplexity is exp(entropy) of the code histogram, the number of equally likely "
            "codes with the same spread (at most K)."
        ],
        Table(
            ["level", "K", "codes used", "usage", "perplexity"],
            [
                [
                    level,
                    up.tok.codebook_sizes[level],
                    int(metrics.get(f"test/codes_used/{level}", 0)),
                    metrics.get(f"test/usage/{level}", math.nan),
                    metrics.get(f"test/perplexity/{level}", math.nan),
                ]
                for level in up.tok.levels
            ],
        ),
    )
    if counts and any(c.sum() for c in counts.values()):
        section.figures.append(
            Figure(
                "Code usage per level: each code's share of the test split's codes, most used first",
                "figures/code-usage.png",
                code_usage_figure(counts),
            )
        )
    return section


def _prior_section(ctx: StageContext, up: Upstream, metrics: dict[str, float]) -> Section:
    rows = []
    for level in up.tok.levels:
        entry = up.priors.priors.get(level)
        if entry is None:
            continue
        k = up.tok.codebook_sizes[level]
        bits = metrics.get(f"test/bits_per_code/{level}", math.nan)
        rows.append(
            [
                level,
                entry.kind,
                entry.condition or "-",
                k,
                math.log2(k),
                bits,
                bits / math.log2(k) if k > 1 else math.nan,
                math.nan
                if entry.validation_bits_per_code is None
                else entry.validation_bits_per_code,
            ]
        )
    cfg = ctx.cfg.evaluate
    return Section(
        "Priors",
        [
            "Negative log-likelihood of the test split's code maps, in bits per code "
            f"(up to {cfg.holdout_batches * cfg.batch_size} maps). "
            "log2(K) is what a uniform guess costs; a useful prior stays well below it."
        ],
        Table(
            [
                "level",
                "prior",
                "conditioned on",
                "K",
                "log2 K",
                "bits/code",
                "bits / log2 K",
                "validation bits/code (train_prior)",
            ],
            rows,
        ),
    )


def _samples_section(
    ctx: StageContext,
    sample: SampleManifest | None,
    metrics: dict[str, float],
    cas_note: str | None,
) -> Section:
    section = Section("Samples and Classification Accuracy Score")
    if sample is not None:
        settings = sample.settings
        shown = settings.model_dump(exclude={"rejection"})
        section.paragraphs.append(
            f"{sample.samples} samples; settings: "
            + ", ".join(f"{k}={v}" for k, v in shown.items())
            + (", with classifier rejection" if settings.rejection.get("enabled") else "")
            + "."
        )
    if cas_note:
        section.paragraphs.append(f"CAS not computed: {cas_note}.")
    else:
        section.paragraphs.append(
            "CAS trains a classifier on generated images only and tests it on real test-split "
            "images; the same classifier trained on real images for the same number of steps "
            f"({ctx.cfg.evaluate.classifier_steps}) gives the reference. Accuracies are among the "
            "sampled classes."
        )
        section.table = _metric_table(
            metrics,
            [
                (
                    "cas/generated_to_real",
                    "CAS: trained on samples, tested on real test images",
                ),
                (
                    "cas/real_to_real",
                    "reference: trained on real train images, tested on real test images",
                ),
                ("cas/ratio", "CAS / reference"),
                (
                    "cas/real_to_generated",
                    "real-trained classifier on the samples (class fidelity)",
                ),
            ],
        )
    if sample is not None:
        for name, entry in sample.classes.items():
            if storage.exists(entry.grid):
                section.figures.append(
                    Figure(
                        f"samples: {name}",
                        f"figures/grid-{name}.png",
                        storage.read_bytes(entry.grid),
                    )
                )
    return section


def build_report(
    ctx: StageContext,
    up: Upstream,
    metrics: dict[str, float],
    figures: Figures,
    cas_note: str | None,
    notes: list[str],
) -> Report:
    everything = Section(
        "All metrics",
        table=Table(["metric", "value"], [[k, v] for k, v in sorted(metrics.items())]),
    )
    return Report(
        "Evaluation report",
        [
            _summary_section(up, notes),
            _reconstruction_section(metrics, figures.reconstructions),
            _codebook_section(up, metrics, figures.code_counts),
            _prior_section(ctx, up, metrics),
            Section(
                "Training curves",
                [
                    "Read back from the training stages' MLflow runs. Validation curves during "
                    "training are on the validation split; the test score is measured here."
                ]
                if figures.curves
                else ["No training runs were tracked, so there are no curves."],
                figures=figures.curves,
            ),
            _samples_section(ctx, up.sample, metrics, cas_note),
            everything,
        ],
    )


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
    sections=("seed", "data"),
    reads_corpus=True,
    enabled=lambda cfg: cfg.evaluate.enabled,
)
