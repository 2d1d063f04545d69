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
