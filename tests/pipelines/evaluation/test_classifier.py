"""The classifier behind CAS, the judge and rejection sampling."""

from __future__ import annotations

import pytest
import torch

from pipelines.data.demo_data import generate_corpus
from pipelines.data.images import to_model_input
from pipelines.evaluation.classifier import ImageClassifier, accuracy, train_classifier
from tests.pipelines.stages.test_evaluate import CLASSES, read_folder_corpus


def test_classifier_learns_the_demo_corpus(tmp_path):
    generate_corpus(
        str(tmp_path / "train"), classes=CLASSES, images_per_class=100, image_size=32, seed=3
    )
    generate_corpus(
        str(tmp_path / "test"), classes=CLASSES, images_per_class=25, image_size=32, seed=4
    )
    _, train_images, train_labels = read_folder_corpus(str(tmp_path / "train"))
    _, test_images, test_labels = read_folder_corpus(str(tmp_path / "test"))
    model = train_classifier(
        to_model_input(train_images),
        torch.from_numpy(train_labels),
        len(CLASSES),
        steps=120,
        lr=2e-3,
        seed=0,
    )
    score = accuracy(model, to_model_input(test_images), torch.from_numpy(test_labels))
    assert score > 0.6, score  # chance is 0.25


def test_classifier_training_is_deterministic_and_among_restricts_predictions():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(20, 3, 16, 16, generator=g) * 2 - 1
    labels = torch.arange(20) % 3
    a = train_classifier(images, labels, 3, steps=3, batch_size=8, seed=5)
    b = train_classifier(images, labels, 3, steps=3, batch_size=8, seed=5)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert isinstance(a, ImageClassifier)
    # Restricted to one class, every prediction is that class.
    assert accuracy(a, images, labels, among=[1]) == pytest.approx(
        (labels == 1).float().mean().item()
    )
