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
the sampled classes only, so sampling a subset of classes is still a fair comparison.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipelines.data import storage
from pipelines.errors import InputError
from pipelines.evaluation.classifier import (
    ClassifierConfig,
    LabelledImages,
    labelled_images,
    resize_images,
    train_classifier,
)
from pipelines.evaluation.report import Figure, Report, Section, Table, write_report
from pipelines.generation import REJECTION_CLASSIFIER, draw_samples, prior_order
from pipelines.manifest import read_manifest, require_manifest
from pipelines.stage import StageContext, StageSpec, ensure_ray
from pipelines.stage_manifests import (
    EvaluateManifest,
    SampleManifest,
    TokenizeManifest,
    TrainPriorManifest,
    TrainVQVAEManifest,
)
from pipelines.tokenizer import read_identified, tracking_uri_for
from vq_core.quantizer import code_histogram_stats

log = logging.getLogger("vqpipe")

JUDGE = "judge.pt"


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
    from pipelines.data.images import make_grid, to_uint8

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
    """Per level: usage and perplexity over every code map of the test split; each prior's bits
    per code over the first ``prior_batches`` batches. Also returns each level's code histogram."""
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
    from pipelines.data.images import decode_image, to_model_input

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


def judge_seed(seed: int, avoid: int | None) -> int:
    """The judge's seed: derived from the pipeline seed, and never the rejection classifier's."""
    digest = hashlib.sha256(f"judge/{seed}".encode()).digest()
    derived = int.from_bytes(digest[:4], "big")
    return derived + 1 if derived == avoid else derived


@dataclass(frozen=True)
class RealImages:
    """The real images CAS needs: a pool from the train split, and the test images it scores on."""

    pool: LabelledImages
    test: LabelledImages


@dataclass(frozen=True)
class Judge:
    """The classifier that judges the samples (cas/real_to_generated) and whose penultimate layer
    is the feature space of the FID, precision and recall; trained on real train images only."""

    model: Any
    seed: int
    train_images: int
    steps: int
    lr: float

    def describe(self) -> str:
        return (
            f"{self.model.describe()}; trained from scratch on {self.train_images} real images of "
            f"the train split for {self.steps} Adam steps (lr {self.lr}, batches of 64, random "
            f"flips and shifts, seed {self.seed}); features: its {4 * self.model.config.width} "
            "pooled penultimate activations"
        )


def train_judge(ctx: StageContext, pool: LabelledImages, num_classes: int, avoid: int | None):
    """Train the judge with its own seed (so its own initial weights, batch order and
    augmentations), independent of the sample stage's rejection classifier; save it."""
    from pipelines.evaluation.classifier import save_classifier

    cfg = ctx.cfg.evaluate
    seed = judge_seed(ctx.cfg.seed, avoid)
    log.info("evaluate: judge classifier on %d real train images, seed %d", len(pool), seed)
    model = train_classifier(
        pool.images,
        pool.labels,
        num_classes,
        steps=cfg.classifier_steps,
        lr=cfg.classifier_lr,
        seed=seed,
    )
    save_classifier(model, storage.join(ctx.stage_dir, JUDGE), key=f"judge seed {seed}")
    return Judge(model, seed, len(pool), cfg.classifier_steps, cfg.classifier_lr)


@dataclass
class SeedScores:
    """One sampling seed's results: per test image, whether each classifier got it right; the
    judge's verdict per generated image; and the feature-space figures."""

    seed: int
    generated_images: int
    real_train_images: int
    on_generated: np.ndarray  # bool per test image
    on_real: np.ndarray  # bool per test image
    judged: np.ndarray  # bool per generated image
    quality: dict[str, float]


def score_seed(
    ctx: StageContext,
    seed: int,
    generated: LabelledImages,
    real: RealImages,
    judge: Judge,
    test_features: np.ndarray,
    sampled: list[int],
    num_classes: int,
) -> SeedScores:
    """CAS for one set of samples: a classifier on the samples, the same classifier on as many
    real train images of each class as the samples have, both tested on the real test images."""
    from pipelines.evaluation.cas import class_counts, matched_subset
    from pipelines.evaluation.classifier import correct_predictions, embed_images
    from pipelines.evaluation.feature_space import frechet_distance, precision_recall

    cfg = ctx.cfg.evaluate
    matched = matched_subset(real.pool, class_counts(generated.labels.numpy()), salt=seed)
    log.info(
        "evaluate: seed %d: classifiers on %d generated and %d real images",
        seed,
        len(generated),
        len(matched),
    )
    kwargs = {"steps": cfg.classifier_steps, "lr": cfg.classifier_lr, "seed": seed}
    on_generated = train_classifier(generated.images, generated.labels, num_classes, **kwargs)
    on_real = train_classifier(matched.images, matched.labels, num_classes, **kwargs)
    test = real.test
    quality: dict[str, float] = {}
    generated_features = embed_images(judge.model, generated.images)
    if min(len(generated_features), len(test_features)) >= 2:
        quality["fid"] = frechet_distance(generated_features, test_features)
        quality["fid_real_train"] = frechet_distance(
            embed_images(judge.model, matched.images), test_features
        )
    if min(len(generated_features), len(test_features)) > cfg.neighbours:
        quality["precision"], quality["recall"] = precision_recall(
            test_features, generated_features, k=cfg.neighbours
        )
    return SeedScores(
        seed=seed,
        generated_images=len(generated),
        real_train_images=len(matched),
        on_generated=correct_predictions(on_generated, test.images, test.labels, among=sampled),
        on_real=correct_predictions(on_real, test.images, test.labels, among=sampled),
        judged=correct_predictions(judge.model, generated.images, generated.labels, among=sampled),
        quality=quality,
    )


def _metric_key(name: str) -> str:
    # MLflow metric names allow letters, digits, _ - . / and spaces.
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)


def summarise_seeds(
    scores: list[SeedScores],
    test_labels: np.ndarray,
    class_names: list[str],
    bootstrap_samples: int,
    judge_on_real: np.ndarray | None = None,
) -> dict[str, float]:
    """The CAS and feature-space metrics over every seed: means, bootstrap intervals over the test
    images, per-class accuracies and, for several seeds, the spread across seeds.

    ``judge_on_real`` (bool per test image: the judge got it right) adds how well the judge
    recognises the samples relative to real test images (``cas/recognition_ratio``)."""
    from pipelines.evaluation.cas import bootstrap, bootstrap_ratio, per_class_accuracy, spread

    on_generated = np.stack([s.on_generated for s in scores])
    on_real = np.stack([s.on_real for s in scores])
    cas, real = float(on_generated.mean()), float(on_real.mean())
    metrics: dict[str, float] = {
        "cas/generated_to_real": cas,
        "cas/real_to_real": real,
        "cas/ratio": cas / real if real > 0 else math.nan,
        "cas/real_to_generated": float(np.mean([s.judged.mean() for s in scores])),
        "cas/seeds": len(scores),
        "cas/generated_images": scores[0].generated_images,
        "cas/real_train_images": scores[0].real_train_images,
        "cas/real_test_images": len(test_labels),
    }
    intervals = bootstrap(
        {"generated_to_real": on_generated, "real_to_real": on_real},
        {"ratio": ("generated_to_real", "real_to_real")},
        bootstrap_samples,
    )
    judged = np.concatenate([s.judged for s in scores])
    if judge_on_real is not None and len(judge_on_real) and len(judged):
        on_test = float(np.mean(judge_on_real))
        metrics["cas/judge_on_real"] = on_test
        metrics["cas/recognition_ratio"] = (
            metrics["cas/real_to_generated"] / on_test if on_test > 0 else math.nan
        )
        intervals["recognition_ratio"] = bootstrap_ratio(judged, judge_on_real, bootstrap_samples)
    for name, (low, high) in intervals.items():
        metrics[f"cas/{name}/ci_low"], metrics[f"cas/{name}/ci_high"] = low, high
    for name, correct in (("generated_to_real", on_generated), ("real_to_real", on_real)):
        per_class = per_class_accuracy(correct.mean(axis=0), test_labels)
        for label, value in per_class.items():
            metrics[f"cas/{name}/class/{_metric_key(class_names[label])}"] = value
    for name in ("fid", "fid_real_train", "precision", "recall"):
        values = [s.quality[name] for s in scores if name in s.quality]
        if values:
            metrics[f"quality/{name}"] = float(np.mean(values))
    if len(scores) > 1:
        per_seed = {
            "cas/generated_to_real": [float(s.on_generated.mean()) for s in scores],
            "cas/real_to_real": [float(s.on_real.mean()) for s in scores],
            "cas/ratio": [
                float(s.on_generated.mean() / s.on_real.mean()) if s.on_real.any() else math.nan
                for s in scores
            ],
            "cas/real_to_generated": [float(s.judged.mean()) for s in scores],
        }
        if metrics.get("cas/judge_on_real", 0) > 0:
            per_seed["cas/recognition_ratio"] = [
                v / metrics["cas/judge_on_real"] for v in per_seed["cas/real_to_generated"]
            ]
        for name in ("fid", "precision", "recall"):
            if all(name in s.quality for s in scores):
                per_seed[f"quality/{name}"] = [s.quality[name] for s in scores]
        for name, values in per_seed.items():
            for stat, value in spread(values).items():
                if stat != "mean":
                    metrics[f"{name}/{stat}"] = value
    # An undefined figure (a ratio to a reference that got nothing right) is left out, not NaN.
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


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


@dataclass
class SampleScores:
    """What the CAS and feature-space part of the evaluation found, or why it did not apply."""

    metrics: dict[str, float]
    note: str | None
    judge: Judge | None = None
    left_out: list[str] = field(default_factory=list)  # sampled classes this corpus does not have


def classification_metrics(
    ctx: StageContext,
    class_names: list[str],
    sample_sets: list[tuple[int, dict[str, str]]],
    shape: tuple[int, int, int],
    avoid_seed: int | None = None,
    real_split: str = "test",
) -> SampleScores:
    """CAS, its references and the feature-space figures over every set of generated images in
    ``sample_sets`` ((seed, class name -> folder of PNGs), one per sampling seed), tested on the
    corpus' ``real_split`` images (the validation split, to compare settings without the test
    split)."""
    from pipelines.data.corpus import open_corpus
    from pipelines.evaluation.classifier import correct_predictions, embed_images

    cfg = ctx.cfg.evaluate
    if len(class_names) < 2:
        return SampleScores({}, "the corpus has fewer than 2 classes, so CAS does not apply")
    # Priors trained on several corpora sample classes this run's corpus may not have: with no
    # real images of theirs to test on, they are left out, and the report says so.
    left_out = sorted({n for _, dirs in sample_sets for n in dirs if n not in class_names})
    if left_out:
        log.warning(
            "evaluate: CAS leaves out the sampled classes %s: the corpus %s has no images of them",
            left_out,
            ctx.cfg.data.source,
        )
        sample_sets = [
            (seed, {n: d for n, d in dirs.items() if n in class_names})
            for seed, dirs in sample_sets
        ]
    input_size = ClassifierConfig(num_classes=len(class_names), in_channels=shape[2]).input_size
    generated = [
        (seed, generated_images(dirs, class_names, shape, input_size)) for seed, dirs in sample_sets
    ]
    sampled = sorted(set(generated[0][1].labels.tolist()))
    if len(sampled) < 2:
        return SampleScores(
            {},
            "fewer than 2 classes were sampled; a classifier needs at least 2",
            left_out=left_out,
        )
    corpus = open_corpus(ctx.cfg.data)
    if list(corpus.class_names) != list(class_names):
        raise InputError(
            f"the corpus now has classes {list(corpus.class_names)}, but the models were trained "
            f"on {list(class_names)}; re-run the pipeline from train_vqvae"
        )
    test = labelled_images(corpus.dataset(real_split), cfg.max_images, size=input_size)
    test = test.subset(np.isin(test.labels.numpy(), sampled))
    if len(test) == 0:
        return SampleScores(
            {}, f"the {real_split} split has no images of the sampled classes", left_out=left_out
        )
    pool = labelled_images(corpus.dataset("train"), cfg.max_images, size=input_size)
    pool = pool.subset(np.isin(pool.labels.numpy(), sampled))
    if len(pool) == 0:
        return SampleScores(
            {}, "the train split has no images of the sampled classes", left_out=left_out
        )
    real = RealImages(pool, test)
    judge = train_judge(ctx, pool, len(class_names), avoid_seed)
    test_features = embed_images(judge.model, test.images)
    judge_on_real = correct_predictions(judge.model, test.images, test.labels, among=sampled)
    scores = [
        score_seed(
            ctx, ctx.cfg.seed + index, images, real, judge, test_features, sampled, len(class_names)
        )
        for index, (_, images) in enumerate(generated)
    ]
    metrics = summarise_seeds(
        scores, test.labels.numpy(), class_names, cfg.bootstrap_samples, judge_on_real
    )
    metrics["cas/classes"] = len(sampled)
    metrics["cas/judge_train_images"] = len(pool)
    return SampleScores(metrics, None, judge, left_out)


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
    from pipelines.data.corpus import open_corpus

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
    from pipelines.data.shards import code_dataset, relabel_codes

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
    from pipelines.evaluation.figures import (
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
    scores = SampleScores({}, "the sample stage has not run")
    if up.sample is not None:
        log.info("evaluate: Classification Accuracy Score and feature-space quality")
        shape = (*up.tok.image_size, up.tok.channels)
        scores = classification_metrics(
            ctx, up.tok.class_names, sample_sets(ctx, up), shape, rejection_seed(up.sample)
        )
        metrics.update(scores.metrics)
    cas_note = scores.note
    metrics["evaluate/seconds"] = time.time() - started
    metrics = {k: float(v) for k, v in metrics.items()}
    ctx.tracking.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})

    figures = Figures(recon_grid, counts, _training_curves(ctx, up, metrics))
    uris = _publish(ctx, build_report(ctx, up, metrics, figures, scores, notes))
    return EvaluateManifest(
        metrics=metrics,
        report=uris["markdown"],
        report_html=uris["html"],
        levels=up.tok.levels,
        cas_skipped=cas_note,
        judge_seed=scores.judge.seed if scores.judge else None,
        feature_network=scores.judge.describe() if scores.judge else None,
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
            "stages select on the validation split (the best prior step, the validation curves); "
            "every figure in this report is measured on the test split, which nothing selects "
            "on. The models were trained on the train split only; the CAS reference classifier "
            "too.",
            *notes,
        ],
    )


def _reconstruction_section(metrics: dict[str, float], recon_grid: np.ndarray | None) -> Section:
    from pipelines.data.images import encode_png

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
    from pipelines.evaluation.figures import code_usage_figure

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


def _interval(metrics: dict[str, float], name: str) -> str:
    low, high = metrics.get(f"{name}/ci_low"), metrics.get(f"{name}/ci_high")
    return "-" if low is None else f"[{low:.3g}, {high:.3g}]"


def _seed_spread(metrics: dict[str, float], name: str) -> str:
    if f"{name}/std" not in metrics:
        return "-"
    return f"{metrics[f'{name}/std']:.3g} ({metrics[f'{name}/min']:.3g} to {metrics[f'{name}/max']:.3g})"


def _samples_section(
    ctx: StageContext,
    sample: SampleManifest | None,
    metrics: dict[str, float],
    scores: SampleScores,
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
    if scores.left_out:
        section.paragraphs.append(
            f"Sampled classes left out of CAS, because the corpus has no images of them: "
            f"{', '.join(scores.left_out)}."
        )
    if scores.note:
        section.paragraphs.append(f"CAS not computed: {scores.note}.")
    else:
        cfg = ctx.cfg.evaluate
        seeds = int(metrics["cas/seeds"])
        section.paragraphs.append(
            "CAS trains a classifier on generated images only and tests it on real test-split "
            f"images. The reference trains the same classifier, for the same {cfg.classifier_steps} "
            f"steps, on as many real train-split images as there are generated ones, class by "
            f"class ({int(metrics['cas/real_train_images'])} images). Accuracies are among the "
            f"sampled classes, over {int(metrics['cas/real_test_images'])} test images; intervals "
            f"are bootstrap 95% intervals over the test images ({cfg.bootstrap_samples} "
            "resamples, the same for both classifiers). The samples are judged by a classifier "
            f"trained independently of the one that rejection sampling used (seed "
            f"{scores.judge.seed}), on {int(metrics['cas/judge_train_images'])} real train "
            "images; its recognition ratio is its accuracy on the samples over its accuracy on "
            "the real test images (interval: samples and test images resampled independently)."
            + (
                f" Figures are means over {seeds} sampling seeds; the spread column gives their "
                "standard deviation and range."
                if seeds > 1
                else " One sampling seed (evaluate.seeds > 1 measures the spread across seeds)."
            )
        )
        meanings = [
            ("cas/generated_to_real", "CAS: trained on samples, tested on real test images"),
            ("cas/real_to_real", "reference: trained on size-matched real train images"),
            ("cas/ratio", "CAS / reference"),
            ("cas/real_to_generated", "the judge on the samples (class fidelity)"),
            ("cas/judge_on_real", "the judge on real test images"),
            (
                "cas/recognition_ratio",
                "samples recognised by the judge, relative to real test images "
                "(the two rows above)",
            ),
        ]
        section.table = Table(
            ["metric", "value", "95% interval", "spread over seeds", "meaning"],
            [
                [k, metrics[k], _interval(metrics, k), _seed_spread(metrics, k), meaning]
                for k, meaning in meanings
                if k in metrics
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


def _per_class_section(class_names: list[str], metrics: dict[str, float]) -> Section | None:
    rows = []
    for name in class_names:
        key = _metric_key(name)
        if f"cas/generated_to_real/class/{key}" in metrics:
            rows.append(
                [
                    name,
                    metrics[f"cas/generated_to_real/class/{key}"],
                    metrics[f"cas/real_to_real/class/{key}"],
                ]
            )
    if not rows:
        return None
    return Section(
        "CAS per class",
        [
            "Accuracy among each class's real test images (a class CAS misses points at a class "
            "the samples do not carry)."
        ],
        Table(["class", "CAS (trained on samples)", "reference (size-matched real)"], rows),
    )


def _quality_section(
    metrics: dict[str, float], scores: SampleScores, neighbours: int
) -> Section | None:
    if scores.judge is None or "quality/fid" not in metrics:
        return None
    return Section(
        "Sample quality in feature space",
        [
            "Fréchet distance between Gaussians fitted to the features of the generated images "
            "and of the real test images (an FID, but not comparable with published FIDs: the "
            "feature network is not Inception), and precision and recall of the samples "
            f"(Kynkäänniemi et al. 2019; k-nearest-neighbour manifolds, k = "
            f"{neighbours}). The distance is biased "
            "upwards for small sets: compare it with quality/fid_real_train, the same distance "
            "from as many real train images as there are samples, the floor a perfect model "
            "would reach.",
            f"Feature network: {scores.judge.describe()}.",
        ],
        Table(
            ["metric", "value", "spread over seeds"],
            [
                [k, metrics[k], _seed_spread(metrics, k)]
                for k in (
                    "quality/fid",
                    "quality/fid_real_train",
                    "quality/precision",
                    "quality/recall",
                )
                if k in metrics
            ],
        ),
    )


def build_report(
    ctx: StageContext,
    up: Upstream,
    metrics: dict[str, float],
    figures: Figures,
    scores: SampleScores,
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
            _samples_section(ctx, up.sample, metrics, scores),
            *[
                extra
                for extra in (
                    _per_class_section(up.tok.class_names, metrics),
                    _quality_section(metrics, scores, ctx.cfg.evaluate.neighbours),
                )
                if extra is not None
            ],
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
    # sample: evaluate.seeds > 1 draws more samples with the sample stage's settings.
    sections=("seed", "data", "sample"),
    reads_corpus=True,
    enabled=lambda cfg: cfg.evaluate.enabled,
)
