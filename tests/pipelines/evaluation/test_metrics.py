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
