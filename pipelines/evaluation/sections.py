"""What the evaluate report says: its sections, built from the metrics and the upstream manifests.

``build_report`` returns the page as a ``Report``; ``pipelines.evaluation.report`` lays it out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipelines.config import EvaluateSection
from pipelines.data import storage
from pipelines.data.images import encode_png
from pipelines.evaluation.figures import code_usage_figure
from pipelines.evaluation.metrics import SampleScores, metric_key
from pipelines.evaluation.report import Figure, Report, Section, Table
from pipelines.evaluation.upstream import Upstream
from pipelines.stage_manifests import SampleManifest, TokenizeManifest


@dataclass(frozen=True)
class Figures:
    """The pictures of the report: reconstructions, code histograms per level, training curves."""

    reconstructions: np.ndarray | None
    code_counts: dict[str, np.ndarray]
    curves: list[Figure]


def build_report(
    up: Upstream,
    cfg: EvaluateSection,
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
            _codebook_section(up.tok, metrics, figures.code_counts),
            _prior_section(up, cfg.holdout_batches * cfg.batch_size, metrics),
            _curves_section(figures.curves),
            _samples_section(up.sample, metrics, scores, cfg),
            *[
                extra
                for extra in (
                    _per_class_section(up.tok.class_names, metrics),
                    _quality_section(metrics, scores, cfg.neighbours),
                )
                if extra is not None
            ],
            everything,
        ],
    )


# -------------------------------------------------------------------------------------------------
# Tables


def _metric_table(metrics: dict[str, float], names: list[tuple[str, str]]) -> Table:
    return Table(
        ["metric", "value", "meaning"],
        [[k, metrics[k], meaning] for k, meaning in names if k in metrics],
    )


def _interval(metrics: dict[str, float], name: str) -> str:
    low, high = metrics.get(f"{name}/ci_low"), metrics.get(f"{name}/ci_high")
    return "-" if low is None else f"[{low:.3g}, {high:.3g}]"


def _seed_spread(metrics: dict[str, float], name: str) -> str:
    if f"{name}/std" not in metrics:
        return "-"
    return f"{metrics[f'{name}/std']:.3g} ({metrics[f'{name}/min']:.3g} to {metrics[f'{name}/max']:.3g})"


# -------------------------------------------------------------------------------------------------
# The autoencoder and the priors


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
            f"Corpus: {tok.samples} images tokenized ({splits}), "
            + (
                f"classes: {', '.join(tok.class_names)}."
                if tok.labelled
                else "unlabelled: no classes; the priors are unconditional."
            ),
            "Splits are by key hash (data.validation_fraction, data.test_fraction). The training "
            "stages select on the validation split (the best prior step, the validation curves); "
            "every figure in this report is measured on the test split, which nothing selects "
            "on. The models were trained on the train split only"
            + ("; the CAS reference classifier too." if tok.labelled else "."),
            *notes,
        ],
    )


def _reconstruction_section(metrics: dict[str, float], recon_grid: np.ndarray | None) -> Section:
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
    tok: TokenizeManifest, metrics: dict[str, float], counts: dict[str, np.ndarray]
) -> Section:
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
                    tok.codebook_sizes[level],
                    int(metrics.get(f"test/codes_used/{level}", 0)),
                    metrics.get(f"test/usage/{level}", math.nan),
                    metrics.get(f"test/perplexity/{level}", math.nan),
                ]
                for level in tok.levels
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


def _prior_section(up: Upstream, most_maps: int, metrics: dict[str, float]) -> Section:
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
    return Section(
        "Priors",
        [
            "Negative log-likelihood of the test split's code maps, in bits per code "
            f"(up to {most_maps} maps). "
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


def _curves_section(curves: list[Figure]) -> Section:
    return Section(
        "Training curves",
        [
            "Read back from the training stages' MLflow runs. Validation curves during "
            "training are on the validation split; the test score is measured here."
        ]
        if curves
        else ["No training runs were tracked, so there are no curves."],
        figures=curves,
    )


# -------------------------------------------------------------------------------------------------
# The samples


def _samples_section(
    sample: SampleManifest | None,
    metrics: dict[str, float],
    scores: SampleScores,
    cfg: EvaluateSection,
) -> Section:
    labelled = sample is None or sample.labelled
    section = Section("Samples and Classification Accuracy Score" if labelled else "Samples")
    if sample is not None:
        section.paragraphs.append(_sampling_settings(sample))
    if scores.left_out:
        section.paragraphs.append(
            f"Sampled classes left out of CAS, because the corpus has no images of them: "
            f"{', '.join(scores.left_out)}."
        )
    if scores.note:
        section.paragraphs.append(f"CAS not computed: {scores.note}.")
    else:
        section.paragraphs.append(_cas_method(metrics, scores, cfg))
        section.table = _cas_table(metrics)
    if sample is not None:
        section.figures += _sample_grids(sample)
    return section


def _sampling_settings(sample: SampleManifest) -> str:
    settings = sample.settings
    shown = settings.model_dump(exclude={"rejection", "levels"})
    stage = (settings.temperature, settings.top_k, settings.top_p, settings.guidance)
    # The levels drawn otherwise than the stage's settings say (sample.levels).
    own = [
        f"{level} " + ", ".join(f"{k}={v}" for k, v in drawn.model_dump().items())
        for level, drawn in settings.levels.items()
        if (drawn.temperature, drawn.top_k, drawn.top_p, drawn.guidance) != stage
    ]
    return (
        f"{sample.samples} samples; settings: "
        + ", ".join(f"{k}={v}" for k, v in shown.items())
        + (", with classifier rejection" if settings.rejection.get("enabled") else "")
        + (f"; levels drawn with their own settings: {'; '.join(own)}" if own else "")
        + "."
    )


def _cas_method(metrics: dict[str, float], scores: SampleScores, cfg: EvaluateSection) -> str:
    seeds = int(metrics["cas/seeds"])
    return (
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


def _cas_table(metrics: dict[str, float]) -> Table:
    meanings = [
        ("cas/generated_to_real", "CAS: trained on samples, tested on real test images"),
        ("cas/real_to_real", "reference: trained on size-matched real train images"),
        ("cas/ratio", "CAS / reference"),
        ("cas/real_to_generated", "the judge on the samples (class fidelity)"),
        ("cas/judge_on_real", "the judge on real test images"),
        (
            "cas/recognition_ratio",
            "samples recognised by the judge, relative to real test images (the two rows above)",
        ),
    ]
    return Table(
        ["metric", "value", "95% interval", "spread over seeds", "meaning"],
        [
            [k, metrics[k], _interval(metrics, k), _seed_spread(metrics, k), meaning]
            for k, meaning in meanings
            if k in metrics
        ],
    )


def _sample_grids(sample: SampleManifest) -> list[Figure]:
    return [
        Figure(f"samples: {name}", f"figures/grid-{name}.png", storage.read_bytes(entry.grid))
        for name, entry in sample.classes.items()
        if storage.exists(entry.grid)
    ]


def _per_class_section(class_names: list[str], metrics: dict[str, float]) -> Section | None:
    rows = []
    for name in class_names:
        key = metric_key(name)
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
    if scores.features is None or "quality/fid" not in metrics:
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
            f"Feature network: {scores.features}.",
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
