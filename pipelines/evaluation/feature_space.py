"""Distances between two sets of images, measured on their features from a classifier.

- Fréchet distance (the FID of Heusel et al. 2017 when the features are Inception's): fit a
  Gaussian to each set's features and compute ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2).
  Identical sets give 0. It is biased upwards for small sets, so compare it with the distance
  between two real sets of the same sizes, never with published FIDs (other network, other data).
- Precision and recall (Kynkäänniemi et al. 2019): each set's manifold is the union of balls
  around its points, each ball reaching the point's k-th nearest neighbour within the set.
  Precision is the share of generated points inside the real manifold (are samples realistic?),
  recall the share of real points inside the generated manifold (is the variety covered?).

Features are N x D float arrays; everything here is plain numpy.
"""

from __future__ import annotations

import numpy as np


def _check_features(features: np.ndarray, name: str, minimum: int) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"{name} must be an N x D array of features, got shape {features.shape}")
    if len(features) < minimum:
        raise ValueError(f"{name} needs at least {minimum} feature vectors, got {len(features)}")
    return features


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative rounding clipped)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` and ``b`` (N x D each)."""
    a, b = _check_features(a, "a", 2), _check_features(b, "b", 2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} and {b.shape[1]}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((S_a S_b)^1/2) = Tr((S_a^1/2 S_b S_a^1/2)^1/2), whose argument is symmetric PSD, so an
    # eigendecomposition is exact where the general matrix square root is not.
    root_a = _sqrtm_psd(cov_a)
    cross = np.trace(_sqrtm_psd(root_a @ cov_b @ root_a))
    distance = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)
    return max(distance, 0.0)  # rounding can leave -1e-12 for identical sets


def _pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    squared = (a**2).sum(1)[:, None] - 2 * a @ b.T + (b**2).sum(1)[None, :]
    return np.sqrt(np.clip(squared, 0, None))


def _manifold_radii(points: np.ndarray, k: int) -> np.ndarray:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    distances = _pairwise_distances(points, points)
    return np.sort(distances, axis=1)[:, k]  # column 0 is the point itself


def _coverage(manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray) -> float:
    """Share of ``queries`` inside at least one ball of the manifold."""
    inside = _pairwise_distances(queries, manifold) <= radii[None, :]
    return float(inside.any(axis=1).mean())


def precision_recall(real: np.ndarray, generated: np.ndarray, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of ``generated`` against ``real`` with k-nearest-neighbour manifolds."""
    real = _check_features(real, "real", k + 1)
    generated = _check_features(generated, "generated", k + 1)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    precision = _coverage(real, _manifold_radii(real, k), generated)
    recall = _coverage(generated, _manifold_radii(generated, k), real)
    return precision, recall
