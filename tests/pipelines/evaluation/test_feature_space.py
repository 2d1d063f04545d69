"""FID-style distance and precision/recall on classifier features, checked with real numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.data.images import to_model_input
from pipelines.evaluation.classifier import embed_images, train_classifier
from pipelines.evaluation.feature_space import frechet_distance, precision_recall


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # A shift moves only the means: distance = |shift|^2.
    shift = np.array([1.0, -2.0, 0.5])
    assert frechet_distance(a, a + shift) == pytest.approx((shift**2).sum(), rel=1e-9)
    # Scaling one set by s: Tr(S + s^2 S - 2 s S) = (1 - s)^2 Tr(S), about 3 (1 - s)^2 here.
    assert frechet_distance(a, 2 * a) == pytest.approx(3.0, rel=0.1)
    with pytest.raises(ValueError, match="feature sizes differ: 3 and 2"):
        frechet_distance(a, a[:, :2])


def test_precision_recall_of_a_set_against_itself_is_one_and_of_a_far_set_zero():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(200, 4))
    assert precision_recall(real, real, k=3) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)
    # Balls reach the k-th neighbour: a slightly perturbed copy is still wholly inside.
    jittered = real + rng.normal(scale=1e-3, size=real.shape)
    assert precision_recall(real, jittered, k=3) == (1.0, 1.0)
    # Samples from one corner of the real data: realistic (high precision), not varied (low recall).
    corner = real[real[:, 0] > 1.0]
    precision, recall = precision_recall(real, corner, k=3)
    assert precision == 1.0 and recall < 0.5
    with pytest.raises(ValueError, match="needs at least 4 feature vectors, got 2"):
        precision_recall(real, real[:2], k=3)


def test_on_demo_images_a_one_class_set_is_farther_than_real_images_of_every_class(tmp_path):
    from pipelines.data.demo_data import generate_corpus
    from tests.pipelines.stages.test_evaluate import CLASSES, read_folder_corpus

    generate_corpus(
        str(tmp_path), CLASSES, images_per_class=24, image_size=16, seed=7, background="palette"
    )
    _, images, labels = read_folder_corpus(str(tmp_path))
    x, y = to_model_input(images), torch.from_numpy(labels)
    even, odd = np.arange(0, len(x), 2), np.arange(1, len(x), 2)
    network = train_classifier(x[even], y[even], len(CLASSES), steps=60, lr=3e-3, seed=0)
    features = embed_images(network, x)
    real = features[even]
    # Two sets of 12 held-out images: one of every class (3 each), one of the first class only.
    mixed = features[odd][:: len(CLASSES)]
    one_class = features[odd][labels[odd] == 0]
    assert len(mixed) == len(one_class) == 12
    assert sorted(set(labels[odd][:: len(CLASSES)])) == [0, 1, 2, 3]
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(real, one_class) > 1.5 * frechet_distance(real, mixed)
    assert precision_recall(real, real, k=3) == (1.0, 1.0)


def frechet_by_scipy(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2), covariances over the N samples."""
    from scipy.linalg import sqrtm

    def covariance(x):
        centred = x - x.mean(axis=0)
        return centred.T @ centred / (len(x) - 1)

    s_a, s_b = covariance(a), covariance(b)
    cross = np.trace(sqrtm(s_a @ s_b)).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a + s_b) - 2 * cross)


def test_frechet_distance_of_correlated_features_matches_scipy():
    # Features whose dimensions have different scales and are correlated, N != D and the two
    # sets of different sizes: covariances over the wrong axis would give another number.
    rng = np.random.default_rng(3)
    mix_a = np.array([[2.0, 0.5, 0.0, 0.1], [0.0, 1.0, 0.8, 0.0], [0.0, 0.0, 0.3, 0.2],
                      [0.0, 0.0, 0.0, 1.5]])  # fmt: skip
    mix_b = np.array([[1.0, 0.0, 0.0, 0.0], [0.7, 0.5, 0.0, 0.0], [0.0, 0.4, 2.0, 0.0],
                      [0.3, 0.0, 0.5, 0.8]])  # fmt: skip
    a = rng.normal(size=(60, 4)) @ mix_a
    b = rng.normal(size=(45, 4)) @ mix_b + np.array([0.5, -1.0, 0.0, 2.0])
    expected = frechet_by_scipy(a, b)
    assert expected > 1.0
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_two_vectors_per_set_and_the_documented_minimum():
    # Two vectors x1, x2: mean (x1 + x2) / 2, covariance u u^T with u = (x1 - x2) / sqrt 2 (rank
    # one: the rest of its eigenvalues are rounding, some below 0). Then Tr((S_a S_b)^1/2) =
    # |u . v|, and the distance is |mu_a - mu_b|^2 + |u|^2 + |v|^2 - 2 |u . v|.
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 3)), rng.normal(size=(2, 3))
    u, v = (a[0] - a[1]) / np.sqrt(2), (b[0] - b[1]) / np.sqrt(2)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + u @ u + v @ v - 2 * abs(u @ v)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="^a needs at least 2 feature vectors, got 1$"):
        frechet_distance(a[:1], b)
    with pytest.raises(ValueError, match="^b needs at least 2 feature vectors, got 1$"):
        frechet_distance(a, b[:1])


def brute_force_precision_recall(real: np.ndarray, generated: np.ndarray, k: int):
    """Kynkäänniemi et al.'s precision and recall with explicit loops over points (float64)."""
    real, generated = real.astype(np.float64), generated.astype(np.float64)

    def radii(points):
        out = []
        for i, p in enumerate(points):
            others = sorted(np.linalg.norm(p - q) for j, q in enumerate(points) if j != i)
            out.append(others[k - 1])  # the k-th nearest neighbour
        return out

    def share_inside(manifold, queries):
        r = radii(manifold)
        inside = [
            any(np.linalg.norm(q - m) <= r[j] for j, m in enumerate(manifold)) for q in queries
        ]
        return sum(inside) / len(queries)

    return share_inside(real, generated), share_inside(generated, real)


def test_precision_recall_matches_a_brute_force_count_with_the_default_k_of_3():
    # Small distances (most below 1) and sets that overlap in part, so that neither figure is
    # 0 or 1, and k = 3 and k = 4 give different figures on these points.
    rng = np.random.default_rng(4)
    real = rng.normal(scale=0.3, size=(40, 3))
    generated = rng.normal(scale=0.3, size=(30, 3)) + np.array([0.4, 0.0, 0.0])
    expected = brute_force_precision_recall(real, generated, k=3)
    assert all(0 < value < 1 for value in expected)
    assert brute_force_precision_recall(real, generated, k=4) != expected
    assert precision_recall(real, generated) == expected
    assert precision_recall(real, generated, k=2) == brute_force_precision_recall(
        real, generated, k=2
    )


def test_precision_recall_of_float32_features_is_computed_in_float64():
    # Features far from the origin with small differences: |x|^2 - 2 x.y + |y|^2 in float32
    # loses the differences, in float64 it keeps them.
    rng = np.random.default_rng(5)
    real = (1000.0 + rng.normal(scale=0.05, size=(30, 4))).astype(np.float32)
    generated = (1000.0 + rng.normal(scale=0.05, size=(30, 4)) + 0.03).astype(np.float32)
    expected = brute_force_precision_recall(real, generated, k=3)
    assert all(0 < value < 1 for value in expected)
    assert precision_recall(real, generated, k=3) == expected


def test_precision_recall_balls_are_closed_and_k_can_be_1():
    # One dimension, k = 1. Real points 0, 1, 10, 11: each ball has radius 1, the real manifold
    # is [-1, 2] and [9, 12]. Generated -1 and 12 lie exactly on a ball's edge (inside), 2.5 and
    # 5 outside: precision 2/4. Generated radii (nearest other): 3.5, 2.5, 2.5, 7, a manifold
    # [-4.5, 19] that holds every real point: recall 1.
    real = np.array([[0.0], [1.0], [10.0], [11.0]])
    generated = np.array([[-1.0], [2.5], [5.0], [12.0]])
    assert precision_recall(real, generated, k=1) == (0.5, 1.0)


def test_precision_recall_minimum_sizes_and_errors():
    rng = np.random.default_rng(6)
    four, three = rng.normal(size=(4, 2)), rng.normal(size=(3, 2))
    # k + 1 vectors per set are enough: each point has k others.
    assert precision_recall(four, four + 0.01, k=3) == (1.0, 1.0)
    with pytest.raises(ValueError, match="^real needs at least 4 feature vectors, got 3$"):
        precision_recall(three, four, k=3)
    with pytest.raises(ValueError, match="^generated needs at least 4 feature vectors, got 3$"):
        precision_recall(four, three, k=3)
    with pytest.raises(ValueError, match="^k must be at least 1, got 0$"):
        precision_recall(four, four, k=0)
