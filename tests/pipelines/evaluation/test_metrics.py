"""The evaluate stage's figures: PSNR, codebook statistics, the judge, CAS over seeds."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.config import parse_config
from pipelines.data.demo_data import generate_corpus
from pipelines.data.images import to_model_input
from pipelines.data.keys import split_of
from pipelines.evaluation.classifier import accuracy, load_classifier
from pipelines.evaluation.metrics import (
    JUDGE,
    SeedScores,
    classification_metrics,
    histogram_stats,
    judge_seed,
    metric_key,
    psnr_from_mse,
    summarise_seeds,
)
from tests.pipelines.conftest import tiny_raw_config
from tests.pipelines.stages.test_evaluate import CLASSES, read_folder_corpus


def test_histogram_stats_and_psnr_helpers():
    perplexity, usage, used = histogram_stats(np.array([5, 5, 0, 0]))
    assert perplexity == pytest.approx(2.0) and usage == 0.5 and used == 2
    assert psnr_from_mse(4 * 0.01) == pytest.approx(20.0)  # MSE 0.01 on the [0, 1] scale


def test_judge_seed_never_equals_the_rejection_seed():
    derived = judge_seed(0, avoid=None)
    assert judge_seed(0, avoid=derived) != derived
    assert judge_seed(0, avoid=derived + 5) == derived


def seed_scores(seed: int, on_generated, on_real, judged, fid: float) -> SeedScores:
    return SeedScores(
        seed=seed,
        generated_images=len(judged),
        real_train_images=len(judged),
        on_generated=np.array(on_generated, dtype=bool),
        on_real=np.array(on_real, dtype=bool),
        judged=np.array(judged, dtype=bool),
        quality={"fid": fid},
    )


def test_summary_over_seeds_gives_means_per_class_figures_and_spread():
    # Four test images of classes 0, 0, 1, 1; two seeds.
    scores = [
        seed_scores(0, [1, 1, 0, 0], [1, 1, 1, 1], [1, 0], fid=2.0),
        seed_scores(1, [1, 1, 1, 1], [1, 1, 1, 0], [1, 1], fid=4.0),
    ]
    m = summarise_seeds(
        scores, np.array([0, 0, 1, 1]), ["a", "b c"], 200, judge_on_real=np.array([1, 0, 1, 1])
    )
    assert m["cas/generated_to_real"] == 0.75 and m["cas/real_to_real"] == 0.875
    assert m["cas/ratio"] == pytest.approx(0.75 / 0.875)
    assert m["cas/real_to_generated"] == 0.75 and m["cas/judge_on_real"] == 0.75
    assert m["cas/recognition_ratio"] == 1.0
    assert m["cas/seeds"] == 2 and m["cas/real_test_images"] == 4
    # Per class, the accuracy over both seeds.
    assert m["cas/generated_to_real/class/a"] == 1.0
    assert m["cas/generated_to_real/class/b c"] == 0.5
    assert m["cas/real_to_real/class/b c"] == 0.75
    # Spread across seeds: per-seed figures 0.5 and 1.0, so std (ddof 1) is 0.5 / sqrt 2.
    assert m["cas/generated_to_real/min"] == 0.5 and m["cas/generated_to_real/max"] == 1.0
    assert m["cas/generated_to_real/std"] == pytest.approx(0.5 / math.sqrt(2))
    assert m["quality/fid"] == 3.0 and m["quality/fid/std"] == pytest.approx(math.sqrt(2))
    assert m["cas/recognition_ratio/min"] == pytest.approx(0.5 / 0.75)
    for name in ("generated_to_real", "real_to_real", "recognition_ratio"):
        assert m[f"cas/{name}/ci_low"] <= m[f"cas/{name}"] <= m[f"cas/{name}/ci_high"], name
    assert "cas/generated_to_real/mean" not in m  # the mean is the figure itself


def test_one_seed_has_no_spread_and_undefined_ratios_are_left_out():
    scores = [seed_scores(0, [1, 0], [0, 0], [1, 1], fid=1.0)]
    m = summarise_seeds(scores, np.array([0, 1]), ["a", "b"], 200)
    assert m["cas/real_to_real"] == 0.0
    assert "cas/ratio" not in m and "cas/ratio/ci_low" not in m
    assert "cas/judge_on_real" not in m and "cas/recognition_ratio" not in m
    assert not any(k.endswith("/std") for k in m)


def test_cas_trains_on_the_generated_images_and_tests_on_the_real_ones(ray_local, tmp_path):
    # "Generated" images that are a known set: the real held-out images themselves, filed under
    # their own class, then under the next class's name. The small classifier memorises its few
    # training images, so CAS (train on generated, test on real) is near 1 for the first set and
    # near 0 for the second, whatever the real classifier's accuracy; and the real classifier
    # scores the first set exactly as it scores the real held-out images. CAS computed with the
    # two sets swapped (the real classifier on real images) fails the first assertion.
    corpus = str(tmp_path / "shapes")
    generate_corpus(corpus, classes=CLASSES, images_per_class=40, image_size=16, seed=5)
    cfg = parse_config(
        tiny_raw_config(str(tmp_path / "out"), corpus),
        ["evaluate.classifier_steps=200", "evaluate.classifier_lr=3e-3"],
    )
    keys, images, labels = read_folder_corpus(corpus)
    fractions = (cfg.data.validation_fraction, cfg.data.test_fraction)
    holdout = [i for i, k in enumerate(keys) if split_of(k, *fractions) == "test"]
    out_dir = str(tmp_path / "evaluate")  # where each call saves its judge

    def cas_of(shift: int) -> dict[str, float]:
        classes: dict[str, str] = {}
        for label, name in enumerate(CLASSES):
            folder = tmp_path / f"generated-{shift}" / name
            folder.mkdir(parents=True)
            source = [i for i in holdout if labels[i] == (label + shift) % len(CLASSES)]
            for n, i in enumerate(source):
                Image.fromarray(images[i]).save(folder / f"{n:05d}.png")
            classes[name] = str(folder)
        scores = classification_metrics(cfg, out_dir, list(CLASSES), [(0, classes)], (16, 16, 3))
        assert scores.note is None
        metrics = scores.metrics
        assert metrics["cas/generated_images"] == len(holdout)
        assert metrics["cas/real_test_images"] == len(holdout)
        # The reference saw exactly as many real images as there were generated ones.
        assert metrics["cas/real_train_images"] == len(holdout)
        return metrics

    faithful = cas_of(0)
    assert faithful["cas/generated_to_real"] >= 0.9
    # The "samples" are the test images: the judge scores them as it scores the test split.
    judge, _ = load_classifier(os.path.join(out_dir, JUDGE))
    test_images = to_model_input(images[holdout])
    on_test = accuracy(judge, test_images, torch.from_numpy(labels[holdout]))
    assert faithful["cas/real_to_generated"] == pytest.approx(on_test)
    # ... and recognises them exactly as well as the real test images (which they are).
    assert faithful["cas/judge_on_real"] == pytest.approx(on_test)
    assert faithful["cas/recognition_ratio"] == pytest.approx(1.0)
    low, high = faithful["cas/recognition_ratio/ci_low"], faithful["cas/recognition_ratio/ci_high"]
    assert low <= 1.0 <= high
    # Samples that are real test images sit at distance ~0 from them, inside their manifold.
    assert faithful["quality/fid"] == pytest.approx(0.0, abs=1e-6)
    assert faithful["quality/precision"] == faithful["quality/recall"] == 1.0
    mislabelled = cas_of(1)
    assert mislabelled["cas/generated_to_real"] <= 0.1
    # The judge's accuracy on the test images does not depend on the samples; the recognition
    # ratio is its accuracy on the samples over that.
    assert mislabelled["cas/judge_on_real"] == pytest.approx(on_test)
    assert mislabelled["cas/recognition_ratio"] == pytest.approx(
        mislabelled["cas/real_to_generated"] / on_test
    )
    # Per class too: every class of the mislabelled set is missed.
    for name in CLASSES:
        assert mislabelled[f"cas/generated_to_real/class/{name}"] <= 0.25, name


def test_histogram_stats_of_an_empty_a_single_and_a_sparse_histogram():
    # No codes at all: no perplexity (not the 1.0 of a zero-entropy histogram), nothing used.
    perplexity, usage, used = histogram_stats(np.array([0, 0, 0, 0]))
    assert math.isnan(perplexity) and usage == 0.0 and used == 0
    # One code, once: perplexity 1, a quarter of the codebook used.
    assert histogram_stats(np.array([0, 1, 0, 0])) == (pytest.approx(1.0), 0.25, 1)
    # A code seen once is used: p = (1/4, 3/4), perplexity exp(H).
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert histogram_stats(np.array([1, 3, 0, 0])) == (pytest.approx(math.exp(entropy)), 0.5, 2)


def test_metric_key_keeps_mlflow_characters_and_replaces_the_others_one_by_one():
    assert metric_key("Tabby cat-2.0/B_x") == "Tabby cat-2.0/B_x"
    assert metric_key("dog+wolf") == "dog_wolf"
    assert metric_key("Éa(b)") == "_a_b_"


def test_judge_seed_is_the_first_four_bytes_of_a_hash_of_the_pipeline_seed():
    # int.from_bytes(sha256(b"judge/0").digest()[:4], "big"): the same judge in every run.
    assert judge_seed(0, avoid=None) == 4207547299
    assert judge_seed(42, avoid=None) == 1526212820
    assert 0 <= judge_seed(7, avoid=None) < 2**32


# Two seeds on five test images of classes 0, 0, 1, 1, 1 (per-seed figures in the comments).
FIVE_LABELS = np.array([0, 0, 1, 1, 1])
TWO_CLASSES = ["Tabby cat", "dog+wolf"]  # published as "Tabby cat" and "dog_wolf"


def two_seeds() -> list[SeedScores]:
    def one(seed, on_generated, on_real, judged, quality):
        return SeedScores(
            seed=seed,
            generated_images=3,
            real_train_images=2,  # the pool had fewer real images than samples
            on_generated=np.array(on_generated, dtype=bool),
            on_real=np.array(on_real, dtype=bool),
            judged=np.array(judged, dtype=bool),
            quality=quality,
        )

    return [
        # generated_to_real 0.6, real_to_real 0.8 (ratio 0.75), real_to_generated 2/3
        one(0, [1, 0, 1, 1, 0], [1, 1, 1, 0, 1], [1, 1, 0],
            {"fid": 2.0, "fid_real_train": 1.0, "precision": 0.5, "recall": 0.25}),
        # generated_to_real 0.8, real_to_real 0.4 (ratio 2.0), real_to_generated 1/3
        one(1, [1, 1, 0, 1, 1], [0, 1, 0, 0, 1], [1, 0, 0],
            {"fid": 4.0, "fid_real_train": 3.0, "precision": 1.0, "recall": 0.75}),
    ]  # fmt: skip


def percentile_interval(top: np.ndarray, bottom: np.ndarray | None, samples: int):
    """The documented interval, in plain numpy: one default_rng(0) draw of test-image indices,
    shared; per image the mean over seeds first; percentiles 2.5 and 97.5 of the resampled mean
    (or of the ratio of two resampled means)."""
    draws = np.random.default_rng(0).integers(0, len(top), size=(samples, len(top)))
    value = top[draws].mean(axis=1)
    if bottom is not None:
        value = value / bottom[draws].mean(axis=1)
    return float(np.percentile(value, 2.5)), float(np.percentile(value, 97.5))


def expected_two_seed_summary(samples: int) -> dict[str, float]:
    """Every figure summarise_seeds publishes for ``two_seeds()`` without a judge, by hand."""
    # Per test image, the accuracy over the two seeds.
    generated = np.array([1.0, 0.5, 0.5, 1.0, 0.5])
    real = np.array([0.5, 1.0, 0.5, 0.0, 1.0])
    std2 = 1 / math.sqrt(2)  # std (ddof 1) of two values is |a - b| / sqrt 2
    expected = {
        "cas/generated_to_real": 0.7,
        "cas/real_to_real": 0.6,
        "cas/ratio": 0.7 / 0.6,
        "cas/real_to_generated": 0.5,
        "cas/seeds": 2,
        "cas/generated_images": 3,
        "cas/real_train_images": 2,
        "cas/real_test_images": 5,
        "cas/generated_to_real/class/Tabby cat": 0.75,
        "cas/generated_to_real/class/dog_wolf": 2 / 3,
        "cas/real_to_real/class/Tabby cat": 0.75,
        "cas/real_to_real/class/dog_wolf": 0.5,
        "quality/fid": 3.0,
        "quality/fid_real_train": 2.0,
        "quality/precision": 0.75,
        "quality/recall": 0.5,
        "cas/generated_to_real/std": 0.2 * std2,
        "cas/generated_to_real/min": 0.6,
        "cas/generated_to_real/max": 0.8,
        "cas/real_to_real/std": 0.4 * std2,
        "cas/real_to_real/min": 0.4,
        "cas/real_to_real/max": 0.8,
        "cas/ratio/std": 1.25 * std2,
        "cas/ratio/min": 0.75,
        "cas/ratio/max": 2.0,
        "cas/real_to_generated/std": (1 / 3) * std2,
        "cas/real_to_generated/min": 1 / 3,
        "cas/real_to_generated/max": 2 / 3,
        "quality/fid/std": 2.0 * std2,
        "quality/fid/min": 2.0,
        "quality/fid/max": 4.0,
        "quality/fid_real_train/std": 2.0 * std2,
        "quality/fid_real_train/min": 1.0,
        "quality/fid_real_train/max": 3.0,
        "quality/precision/std": 0.5 * std2,
        "quality/precision/min": 0.5,
        "quality/precision/max": 1.0,
        "quality/recall/std": 0.5 * std2,
        "quality/recall/min": 0.25,
        "quality/recall/max": 0.75,
    }
    for name, top, bottom in (
        ("generated_to_real", generated, None),
        ("real_to_real", real, None),
        ("ratio", generated, real),
    ):
        low, high = percentile_interval(top, bottom, samples)
        expected[f"cas/{name}/ci_low"], expected[f"cas/{name}/ci_high"] = low, high
    return expected


def test_summary_over_two_seeds_publishes_exactly_these_figures():
    expected = expected_two_seed_summary(samples=300)
    assert expected["cas/ratio/ci_low"] < expected["cas/ratio"] < expected["cas/ratio/ci_high"]
    m = summarise_seeds(two_seeds(), FIVE_LABELS, TWO_CLASSES, 300)
    assert sorted(m) == sorted(expected)  # no judge: no recognition ratio, no spread of it
    for name, value in expected.items():
        assert m[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name


def test_a_judge_that_recognises_no_test_image_gives_no_recognition_ratio():
    # The judge got every real test image wrong: its accuracy on them is 0, and the recognition
    # ratio (accuracy on the samples over that) is undefined, so it is left out with its interval
    # and its spread over seeds; everything else is as without a judge.
    m = summarise_seeds(
        two_seeds(), FIVE_LABELS, TWO_CLASSES, 300, judge_on_real=np.zeros(5, dtype=bool)
    )
    expected = expected_two_seed_summary(samples=300) | {"cas/judge_on_real": 0.0}
    assert sorted(m) == sorted(expected)
    for name, value in expected.items():
        assert m[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name


def test_a_seed_whose_reference_got_nothing_right_leaves_the_ratio_without_spread():
    # Seed 1's real reference missed every test image: its ratio is undefined, so the ratio's
    # std, min and max over seeds are left out (not the min of the other seed's 0.5).
    scores = [
        seed_scores(0, [1, 0, 0, 0], [1, 1, 0, 0], [1, 1], fid=1.0),
        seed_scores(1, [1, 1, 0, 0], [0, 0, 0, 0], [1, 1], fid=1.0),
    ]
    m = summarise_seeds(scores, np.array([0, 0, 1, 1]), ["a", "b"], 50)
    assert m["cas/ratio"] == pytest.approx(0.375 / 0.25)  # over both seeds, still defined
    assert m["cas/real_to_real/min"] == 0.0 and m["cas/real_to_real/max"] == 0.5
    assert not [k for k in m if k.startswith("cas/ratio/") and not k.startswith("cas/ratio/ci")]
