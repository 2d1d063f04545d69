"""The evaluate stage's figures: reconstruction, codebooks, priors, and the samples' CAS.

- ``reconstruction_metrics``: MSE of decode(encode(x)) on [-1, 1] images and its PSNR;
- ``code_metrics``: codebook usage and perplexity per level, each prior's bits per code;
- ``classification_metrics``: the Classification Accuracy Score of the samples against a
  size-matched real reference, a judge's verdict on the samples, and the feature-space figures
  (FID, precision, recall) in the judge's penultimate layer, over one or more sampling seeds;
- ``unlabelled_metrics``: for a corpus without labels, where no classifier can be trained, the
  feature-space figures alone, in the features of a fixed random network (``RandomFeatures``).

The arithmetic of a fair CAS (matched references, bootstrap intervals, spread) is in
``pipelines.evaluation.cas``; the distances between feature sets in ``feature_space``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipelines.config import DataSection, EvaluateSection, PipelineConfig
from pipelines.data import storage
from pipelines.data.corpus import Corpus, open_corpus
from pipelines.data.images import decode_image, make_grid, to_model_input, to_uint8
from pipelines.errors import InputError
from pipelines.evaluation.cas import (
    bootstrap,
    bootstrap_ratio,
    class_counts,
    matched_subset,
    per_class_accuracy,
    spread,
)
from pipelines.evaluation.classifier import (
    ClassifierConfig,
    LabelledImages,
    RandomFeatures,
    embed_images,
    labelled_images,
    predicted_classes,
    resize_images,
    save_classifier,
    train_classifier,
)
from pipelines.evaluation.feature_space import frechet_distance, precision_recall
from pipelines.stage import ConfigView
from vq_core.quantizer import code_histogram_stats

log = logging.getLogger("vqpipe")

JUDGE = "judge.pt"  # the judge's file in the folder classification_metrics is given


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


def metric_key(name: str) -> str:
    """``name`` (a class name) as it may appear in an MLflow metric name."""
    # MLflow metric names allow letters, digits, _ - . / and spaces.
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)


# -------------------------------------------------------------------------------------------------
# Reconstructions, codebooks and priors


@torch.inference_mode()
def reconstruction_metrics(
    autoencoder: torch.nn.Module, holdout: LabelledImages, batch_size: int, grid_images: int
) -> tuple[dict[str, float], np.ndarray]:
    """Held-out MSE and PSNR, and a grid of originals (top row) over reconstructions (bottom)."""
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


# -------------------------------------------------------------------------------------------------
# The samples: the images, the judge, one seed's scores


def generated_images(
    sample_dirs: dict[str, str], class_names: list[str], shape: tuple[int, int, int], size: int
) -> LabelledImages:
    """The sample stage's PNGs, labelled with their requested class, resized to ``size``."""
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


def train_judge(
    pool: LabelledImages, num_classes: int, seed: int, cfg: EvaluateSection, uri: str
) -> Judge:
    """Train the judge with its own seed (so its own initial weights, batch order and
    augmentations), independent of the sample stage's rejection classifier; save it at ``uri``."""
    log.info("evaluate: judge classifier on %d real train images, seed %d", len(pool), seed)
    model = train_classifier(
        pool.images,
        pool.labels,
        num_classes,
        steps=cfg.classifier_steps,
        lr=cfg.classifier_lr,
        seed=seed,
    )
    save_classifier(model, uri, key=f"judge seed {seed}")
    return Judge(model, seed, len(pool), cfg.classifier_steps, cfg.classifier_lr)


@dataclass
class SeedScores:
    """One sampling seed's results: per test image, whether each classifier got it right; the
    judge's verdict per generated image; and the feature-space figures. The ``predicted_*``
    arrays hold the classes behind the verdicts (None where only the verdicts are known)."""

    seed: int
    generated_images: int
    real_train_images: int
    on_generated: np.ndarray  # bool per test image
    on_real: np.ndarray  # bool per test image
    judged: np.ndarray  # bool per generated image
    quality: dict[str, float]
    predicted_on_generated: np.ndarray | None = None  # class per test image
    predicted_on_real: np.ndarray | None = None  # class per test image
    predicted_judged: np.ndarray | None = None  # class per generated image


def score_seed(
    cfg: EvaluateSection,
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
    by_generated = predicted_classes(on_generated, test.images, among=sampled)
    by_real = predicted_classes(on_real, test.images, among=sampled)
    by_judge = predicted_classes(judge.model, generated.images, among=sampled)
    return SeedScores(
        seed=seed,
        generated_images=len(generated),
        real_train_images=len(matched),
        on_generated=by_generated == test.labels.numpy(),
        on_real=by_real == test.labels.numpy(),
        judged=by_judge == generated.labels.numpy(),
        quality=quality,
        predicted_on_generated=by_generated,
        predicted_on_real=by_real,
        predicted_judged=by_judge,
    )


# -------------------------------------------------------------------------------------------------
# Every seed together


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
    on_generated = np.stack([s.on_generated for s in scores])
    on_real = np.stack([s.on_real for s in scores])
    metrics = _cas_means(scores, on_generated, on_real, len(test_labels))
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
            metrics[f"cas/{name}/class/{metric_key(class_names[label])}"] = value
    for name in ("fid", "fid_real_train", "precision", "recall"):
        values = [s.quality[name] for s in scores if name in s.quality]
        if values:
            metrics[f"quality/{name}"] = float(np.mean(values))
    if len(scores) > 1:
        metrics.update(_spread_over_seeds(scores, metrics.get("cas/judge_on_real", 0)))
    # An undefined figure (a ratio to a reference that got nothing right) is left out, not NaN.
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def _cas_means(
    scores: list[SeedScores], on_generated: np.ndarray, on_real: np.ndarray, test_images: int
) -> dict[str, float]:
    """The accuracies over every seed and test image, and how many images each one saw."""
    cas, real = float(on_generated.mean()), float(on_real.mean())
    return {
        "cas/generated_to_real": cas,
        "cas/real_to_real": real,
        "cas/ratio": cas / real if real > 0 else math.nan,
        "cas/real_to_generated": float(np.mean([s.judged.mean() for s in scores])),
        "cas/seeds": len(scores),
        "cas/generated_images": scores[0].generated_images,
        "cas/real_train_images": scores[0].real_train_images,
        "cas/real_test_images": test_images,
    }


def _spread_over_seeds(scores: list[SeedScores], judge_on_real: float) -> dict[str, float]:
    """The standard deviation, min and max across seeds of each per-seed figure."""
    per_seed = {
        "cas/generated_to_real": [float(s.on_generated.mean()) for s in scores],
        "cas/real_to_real": [float(s.on_real.mean()) for s in scores],
        "cas/ratio": [
            float(s.on_generated.mean() / s.on_real.mean()) if s.on_real.any() else math.nan
            for s in scores
        ],
        "cas/real_to_generated": [float(s.judged.mean()) for s in scores],
    }
    if judge_on_real > 0:
        per_seed["cas/recognition_ratio"] = [
            v / judge_on_real for v in per_seed["cas/real_to_generated"]
        ]
    for name in ("fid", "fid_real_train", "precision", "recall"):
        if all(name in s.quality for s in scores):
            per_seed[f"quality/{name}"] = [s.quality[name] for s in scores]
    return {
        f"{name}/{stat}": value
        for name, values in per_seed.items()
        for stat, value in spread(values).items()
        if stat != "mean"
    }


@dataclass
class SampleScores:
    """What the CAS and feature-space part of the evaluation found, or why it did not apply."""

    metrics: dict[str, float]
    note: str | None
    judge: Judge | None = None
    left_out: list[str] = field(default_factory=list)  # sampled classes this corpus does not have
    features: str | None = None  # the network behind quality/* (the judge's, or random features)
    predictions: Any = None  # a pyarrow Table, see ``prediction_table``


def classification_metrics(
    cfg: PipelineConfig | ConfigView,
    out_dir: str,
    class_names: list[str],
    sample_sets: list[tuple[int, dict[str, str]]],
    shape: tuple[int, int, int],
    avoid_seed: int | None = None,
    real_split: str = "test",
) -> SampleScores:
    """CAS, its references and the feature-space figures over every set of generated images in
    ``sample_sets`` ((seed, class name -> folder of PNGs), one per sampling seed), tested on the
    corpus' ``real_split`` images (the validation split, to compare settings without the test
    split). The judge is saved in ``out_dir``; ``avoid_seed`` is the rejection classifier's."""
    if len(class_names) < 2:
        return SampleScores({}, "the corpus has fewer than 2 classes, so CAS does not apply")
    sample_sets, left_out = _known_classes(sample_sets, class_names, cfg.data.source)
    input_size = ClassifierConfig(num_classes=len(class_names), in_channels=shape[2]).input_size
    generated = [generated_images(dirs, class_names, shape, input_size) for _, dirs in sample_sets]
    sampled = sorted(set(generated[0].labels.tolist()))
    if len(sampled) < 2:
        return SampleScores(
            {},
            "fewer than 2 classes were sampled; a classifier needs at least 2",
            left_out=left_out,
        )
    corpus = _corpus_of(cfg.data, class_names)
    evaluate = cfg.evaluate
    test = _real_of(corpus, real_split, sampled, evaluate.max_images, input_size)
    if len(test) == 0:
        return SampleScores(
            {}, f"the {real_split} split has no images of the sampled classes", left_out=left_out
        )
    pool = _real_of(corpus, "train", sampled, evaluate.max_images, input_size)
    if len(pool) == 0:
        return SampleScores(
            {}, "the train split has no images of the sampled classes", left_out=left_out
        )
    seed = judge_seed(cfg.seed, avoid_seed)
    judge = train_judge(pool, len(class_names), seed, evaluate, storage.join(out_dir, JUDGE))
    test_features = embed_images(judge.model, test.images)
    judge_on_test = predicted_classes(judge.model, test.images, among=sampled)
    judge_on_real = judge_on_test == test.labels.numpy()
    real, num_classes = RealImages(pool, test), len(class_names)
    scores = [
        score_seed(evaluate, cfg.seed + i, images, real, judge, test_features, sampled, num_classes)
        for i, images in enumerate(generated)
    ]
    metrics = summarise_seeds(
        scores, test.labels.numpy(), class_names, evaluate.bootstrap_samples, judge_on_real
    )
    metrics["cas/classes"] = len(sampled)
    metrics["cas/judge_train_images"] = len(pool)
    predictions = prediction_table(scores, generated, test, judge_on_test)
    return SampleScores(
        metrics, None, judge, left_out, features=judge.describe(), predictions=predictions
    )


PREDICTION_COLUMNS = ("sampling_seed", "classifier", "images", "key", "label", "predicted")


def prediction_table(
    scores: list[SeedScores],
    generated: list[LabelledImages],
    test: LabelledImages,
    judge_on_test: np.ndarray,
) -> Any:
    """Every prediction behind the CAS figures, one row per (classifier, image), as a pyarrow
    Table with the columns of ``PREDICTION_COLUMNS``:

    - ``sampling_seed``: the seed of the samples the row belongs to (null for the judge's rows on
      the test images: the judge does not depend on the samples);
    - ``classifier``: ``generated`` (the CAS classifier trained on that seed's samples), ``real``
      (its size-matched reference trained on real train images) or ``judge``;
    - ``images``: ``test`` (a real test image, ``key`` its corpus key) or ``generated`` (a sample,
      ``key`` its PNG file);
    - ``label``: the image's class (a sample's: the class it was drawn for); ``predicted``: the
      classifier's most probable class among the sampled classes.

    Each accuracy is the mean of ``predicted == label`` over its rows."""
    import pyarrow as pa

    columns: dict[str, list] = {name: [] for name in PREDICTION_COLUMNS}

    def add(seed, classifier, images, keys, labels, predicted) -> None:
        columns["sampling_seed"] += [seed] * len(keys)
        columns["classifier"] += [classifier] * len(keys)
        columns["images"] += [images] * len(keys)
        columns["key"] += list(keys)
        columns["label"] += [int(v) for v in labels]
        columns["predicted"] += [int(v) for v in predicted]

    test_labels = test.labels.tolist()
    add(None, "judge", "test", test.keys, test_labels, judge_on_test)
    for seed_scores, images in zip(scores, generated):
        seed = seed_scores.seed
        add(seed, "generated", "test", test.keys, test_labels, seed_scores.predicted_on_generated)
        add(seed, "real", "test", test.keys, test_labels, seed_scores.predicted_on_real)
        judged = seed_scores.predicted_judged
        add(seed, "judge", "generated", images.keys, images.labels.tolist(), judged)
    types = {"sampling_seed": pa.int64(), "label": pa.int64(), "predicted": pa.int64()}
    return pa.table(
        {name: pa.array(v, types.get(name, pa.string())) for name, v in columns.items()}
    )


# Why an unlabelled corpus' evaluation has no CAS (the report and the evaluate manifest say it).
NO_LABELS = (
    "the corpus has no labels, so CAS does not apply: it trains classifiers on class labels "
    "(the samples' and the real images'); the feature-space figures below need none"
)


def unlabelled_metrics(
    cfg: PipelineConfig | ConfigView,
    sample_sets: list[tuple[int, dict[str, str]]],
    shape: tuple[int, int, int],
    real_split: str = "test",
) -> SampleScores:
    """The feature-space figures of samples from unconditional priors of an unlabelled corpus,
    over every set in ``sample_sets`` ((seed, name -> folder of PNGs)): the Fréchet distance of
    the samples to the real ``real_split`` images, the same distance from as many real train
    images (the floor, ``quality/fid_real_train``), and precision and recall, all in the features
    of a fixed random network (``RandomFeatures``); no CAS, for want of labels."""
    evaluate = cfg.evaluate
    network = RandomFeatures.make(shape[2])
    size = network.model.config.input_size
    corpus = open_corpus(cfg.data)
    if corpus.labelled:
        raise InputError(
            f"the corpus {cfg.data.source!r} now has classes {list(corpus.class_names)}, but the "
            "models were trained on it unlabelled; re-run the pipeline from train_vqvae"
        )
    test = labelled_images(corpus.dataset(real_split), evaluate.max_images, size=size)
    if len(test) < 2:
        return SampleScores(
            {}, f"{NO_LABELS}; and the {real_split} split has fewer than 2 images for them"
        )
    # The first images in key-hash order: the same real train images in every run.
    pool = labelled_images(corpus.dataset("train"), evaluate.max_images, size=size)
    test_features = embed_images(network.model, test.images)
    per_seed: dict[str, list[float]] = {}
    generated_count = 0
    for _, dirs in sample_sets:
        generated = generated_images(dirs, list(dirs), shape, size)
        generated_count = generated_count or len(generated)
        features = embed_images(network.model, generated.images)
        quality = _distances(features, test_features, evaluate.neighbours)
        real = pool.images[: len(generated)]
        if len(real) >= 2:
            quality["fid_real_train"] = frechet_distance(
                embed_images(network.model, real), test_features
            )
        for name, value in quality.items():
            per_seed.setdefault(name, []).append(value)
    metrics: dict[str, float] = {
        "quality/seeds": len(sample_sets),
        "quality/generated_images": generated_count,
        "quality/real_test_images": len(test),
        "quality/real_train_images": min(len(pool), generated_count),
    }
    for name, values in per_seed.items():
        stats = spread(values)
        metrics[f"quality/{name}"] = stats["mean"]
        if len(sample_sets) > 1 and len(values) == len(sample_sets):
            for stat in ("std", "min", "max"):
                metrics[f"quality/{name}/{stat}"] = stats[stat]
    metrics = {k: float(v) for k, v in metrics.items() if math.isfinite(v)}
    return SampleScores(metrics, NO_LABELS, features=network.describe())


def _distances(generated: np.ndarray, real: np.ndarray, neighbours: int) -> dict[str, float]:
    """FID, precision and recall of ``generated`` against ``real`` features, those that their
    sizes allow (as ``score_seed``)."""
    quality: dict[str, float] = {}
    if min(len(generated), len(real)) >= 2:
        quality["fid"] = frechet_distance(generated, real)
    if min(len(generated), len(real)) > neighbours:
        quality["precision"], quality["recall"] = precision_recall(real, generated, k=neighbours)
    return quality


def _known_classes(
    sample_sets: list[tuple[int, dict[str, str]]], class_names: list[str], source: str
) -> tuple[list[tuple[int, dict[str, str]]], list[str]]:
    """The sample sets without the classes the corpus has no images of, and those classes."""
    # Priors trained on several corpora sample classes this run's corpus may not have: with no
    # real images of theirs to test on, they are left out, and the report says so.
    left_out = sorted({n for _, dirs in sample_sets for n in dirs if n not in class_names})
    if not left_out:
        return sample_sets, left_out
    log.warning(
        "evaluate: CAS leaves out the sampled classes %s: the corpus %s has no images of them",
        left_out,
        source,
    )
    kept = [
        (seed, {n: d for n, d in dirs.items() if n in class_names}) for seed, dirs in sample_sets
    ]
    return kept, left_out


def _corpus_of(data: DataSection, class_names: list[str]) -> Corpus:
    """The real corpus, which must still have the classes the models were trained on."""
    corpus = open_corpus(data)
    if list(corpus.class_names) != list(class_names):
        raise InputError(
            f"the corpus now has classes {list(corpus.class_names)}, but the models were trained "
            f"on {list(class_names)}; re-run the pipeline from train_vqvae"
        )
    return corpus


def _real_of(
    corpus: Corpus, split: str, sampled: list[int], max_images: int, size: int
) -> LabelledImages:
    """At most ``max_images`` real images of ``split`` (a fixed key-hash subset), of the sampled
    classes only."""
    images = labelled_images(corpus.dataset(split), max_images, size=size)
    return images.subset(np.isin(images.labels.numpy(), sampled))
