"""The arithmetic behind a fair CAS: size-matched references, bootstrap intervals, seed spread."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.evaluation.cas import (
    bootstrap,
    bootstrap_ratio,
    class_counts,
    matched_subset,
    per_class_accuracy,
    spread,
)
from pipelines.evaluation.classifier import LabelledImages


def pool(per_class: dict[int, int]) -> LabelledImages:
    labels = [label for label, n in per_class.items() for _ in range(n)]
    keys = [f"k{i}" for i in range(len(labels))]
    return LabelledImages(torch.zeros(len(labels), 3, 4, 4), torch.tensor(labels), keys)


def test_matched_subset_takes_exactly_the_generated_class_counts():
    real = pool({0: 30, 1: 30, 2: 30})
    generated_labels = np.array([0] * 5 + [1] * 12 + [2] * 1)
    subset = matched_subset(real, class_counts(generated_labels), salt=0)
    assert class_counts(subset.labels.numpy()) == {0: 5, 1: 12, 2: 1}
    assert len(set(subset.keys)) == len(subset) == len(generated_labels)
    # Another salt (seed) draws other real images; the same salt the same ones.
    assert set(matched_subset(real, {0: 5}, salt=1).keys) != set(
        matched_subset(real, {0: 5}, salt=0).keys
    )
    assert matched_subset(real, {0: 5}, salt=0).keys == matched_subset(real, {0: 5}, salt=0).keys
    # A class the pool lacks images for gives what it has.
    assert len(matched_subset(pool({0: 3}), {0: 10}, salt=0)) == 3


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_images():
    rng = np.random.default_rng(0)
    widths = []
    for n in (40, 640):
        a = rng.random(n) < 0.7
        b = rng.random(n) < 0.9
        intervals = bootstrap({"a": a, "b": b}, {"ratio": ("a", "b")}, samples=1000)
        for name, estimate in (("a", a.mean()), ("b", b.mean()), ("ratio", a.mean() / b.mean())):
            low, high = intervals[name]
            assert low <= estimate <= high, (n, name)
        widths.append(intervals["a"][1] - intervals["a"][0])
    # The width shrinks like 1 / sqrt(n): 16x the images, about a quarter of the width.
    assert widths[1] < widths[0] / 2.5


def test_bootstrap_is_paired_and_averages_repetitions():
    # Two classifiers right on exactly the same images: their ratio is 1 in every resample.
    correct = np.array([True, False, True, True, False, True])
    intervals = bootstrap({"a": correct, "b": correct}, {"r": ("a", "b")}, samples=200)
    assert intervals["r"] == (1.0, 1.0)
    # Repetitions (seeds) x images: the interval is around the mean over both.
    two_seeds = np.array([[True] * 50, [False] * 50])
    low, high = bootstrap({"a": two_seeds}, {}, samples=200)["a"]
    assert low == high == 0.5
    # A reference right on no image: the ratio has no finite interval.
    nothing = np.zeros(30, dtype=bool)
    low, high = bootstrap({"a": correct[:1].repeat(30), "b": nothing}, {"r": ("a", "b")}, 200)["r"]
    assert np.isnan(low) and np.isnan(high)
    with pytest.raises(ValueError, match="same test images"):
        bootstrap({"a": np.ones(3), "b": np.ones(4)}, {}, samples=10)


def test_ratio_of_accuracies_on_different_images_resamples_each_side():
    rng = np.random.default_rng(1)
    on_samples = rng.random(300) < 0.6  # a judge on 300 generated images
    on_test = rng.random(120) < 0.8  # the same judge on 120 real test images
    low, high = bootstrap_ratio(on_samples, on_test, samples=1000)
    assert low < on_samples.mean() / on_test.mean() < high
    # Both sides vary: wider than with the denominator held at its mean.
    fixed_low, fixed_high = bootstrap_ratio(on_samples, np.full(120, on_test.mean()), 1000)
    assert high - low > fixed_high - fixed_low
    # Every image right on both sides: exactly 1.
    assert bootstrap_ratio(np.ones(5), np.ones(7), samples=50) == (1.0, 1.0)
    # A denominator almost always 0 has no finite interval.
    low, high = bootstrap_ratio(np.ones(20), np.eye(1, 40).ravel(), samples=200)
    assert np.isnan(low) and np.isnan(high)
    with pytest.raises(ValueError, match="images on both sides"):
        bootstrap_ratio(np.ones(3), np.ones(0), samples=10)


def test_per_class_accuracy_and_spread():
    correct = np.array([1, 0, 1, 1, 1, 0], dtype=bool)
    labels = np.array([0, 0, 1, 1, 2, 2])
    assert per_class_accuracy(correct, labels) == {0: 0.5, 1: 1.0, 2: 0.5}
    assert spread([0.5, 0.7, 0.6]) == pytest.approx(
        {"mean": 0.6, "std": 0.1, "min": 0.5, "max": 0.7}
    )
    assert spread([0.4])["std"] == 0.0
