"""The arithmetic of a fair Classification Accuracy Score: matched references, intervals, spread.

CAS (Ravuri & Vinyals 2019) trains a classifier on generated images and tests it on real ones;
its reference trains the same classifier on real images. Three things keep the comparison honest:

- the reference sees as many real images as there are generated ones, class by class
  (``matched_subset``): a reference trained on more data would make CAS look worse, one trained
  on fewer would flatter it;
- every accuracy comes with a bootstrap 95% interval over the test images (``bootstrap``), paired:
  each resample draws the same test images for every classifier, so the ratio's interval is
  that of the ratio and not of two independent guesses;
- repeated over several sampling seeds, the spread across seeds (``spread``) shows how much of a
  difference between two runs is noise.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from pipelines.evaluation.classifier import LabelledImages


def salted_rank(key: str, salt: int) -> int:
    """A key's rank in the ``salt``-th deterministic shuffle of the keys."""
    return int.from_bytes(hashlib.sha256(f"{salt}/{key}".encode()).digest()[:8], "big")


def matched_subset(pool: LabelledImages, class_counts: dict[int, int], salt: int) -> LabelledImages:
    """``class_counts[c]`` images of each class c from ``pool``: the first in a shuffle of the
    keys seeded by ``salt``. A class with fewer images in the pool gives all it has."""
    chosen: list[int] = []
    labels = pool.labels.tolist()
    for label, count in sorted(class_counts.items()):
        members = [i for i, y in enumerate(labels) if y == label]
        members.sort(key=lambda i: salted_rank(pool.keys[i], salt))
        chosen += members[:count]
    mask = np.zeros(len(pool), dtype=bool)
    mask[chosen] = True
    return pool.subset(mask)


def class_counts(labels: np.ndarray) -> dict[int, int]:
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


def per_class_accuracy(correct: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """Accuracy among the test images of each class (``correct``: bool per image)."""
    correct, labels = np.asarray(correct, dtype=float), np.asarray(labels)
    return {int(c): float(correct[labels == c].mean()) for c in np.unique(labels)}


def bootstrap(
    correct: dict[str, np.ndarray],
    ratios: dict[str, tuple[str, str]],
    samples: int,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile 95% intervals of accuracies and of ratios of accuracies, resampling test images.

    ``correct[name]`` is an S x N bool array: for each of S repetitions (seeds), whether each of
    the N test images was classified correctly; the accuracy is the mean over both. Every
    resample draws N test images with replacement, the same ones for every name and repetition.
    ``ratios[name] = (numerator, denominator)`` adds the interval of that ratio; NaN when the
    denominator is 0 in more than 2.5% of the resamples (the upper bound would be infinite).
    """
    arrays = {name: np.atleast_2d(np.asarray(c, dtype=float)) for name, c in correct.items()}
    sizes = {a.shape[1] for a in arrays.values()}
    if len(sizes) != 1:
        raise ValueError(f"every classifier must be scored on the same test images, got {sizes}")
    n = sizes.pop()
    if n == 0 or samples < 1:
        raise ValueError(f"need test images and at least one resample, got {n} and {samples}")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(samples, n))
    # Per image, the mean over repetitions; then each resample's mean over its drawn images.
    resampled = {name: a.mean(axis=0)[draws].mean(axis=1) for name, a in arrays.items()}
    intervals = {
        name: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5)))
        for name, v in resampled.items()
    }
    for name, (top, bottom) in ratios.items():
        intervals[name] = _ratio_interval(resampled[top], resampled[bottom])
    return intervals


def _ratio_interval(top: np.ndarray, bottom: np.ndarray) -> tuple[float, float]:
    """Percentile 95% interval of resampled ratios top / bottom; NaN when the denominator is 0 in
    more than 2.5% of the resamples (the upper bound would be infinite)."""
    if (bottom > 0).mean() < 0.975:
        return math.nan, math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = top / bottom
    return float(np.percentile(ratio, 2.5)), float(np.percentile(ratio, 97.5))


def bootstrap_ratio(
    numerator: np.ndarray, denominator: np.ndarray, samples: int, seed: int = 0
) -> tuple[float, float]:
    """Percentile 95% interval of mean(numerator) / mean(denominator) where the two are scored on
    different images (say, one classifier on generated images and on real test images): each
    resample draws both sets with replacement, independently. NaN when the denominator's mean is
    0 in more than 2.5% of the resamples."""
    num = np.asarray(numerator, dtype=float).ravel()
    den = np.asarray(denominator, dtype=float).ravel()
    if len(num) == 0 or len(den) == 0 or samples < 1:
        raise ValueError(
            f"need images on both sides and at least one resample, got {len(num)}, {len(den)} "
            f"and {samples}"
        )
    rng = np.random.default_rng(seed)
    top = num[rng.integers(0, len(num), size=(samples, len(num)))].mean(axis=1)
    bottom = den[rng.integers(0, len(den), size=(samples, len(den)))].mean(axis=1)
    return _ratio_interval(top, bottom)


def spread(values: list[float]) -> dict[str, float]:
    """Mean, standard deviation (ddof 1; 0 for one value), min and max of per-seed figures."""
    a = np.asarray(values, dtype=float)
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
    }
