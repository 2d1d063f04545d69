"""A small image classifier: the judge behind rejection sampling and the Classification Accuracy Score.

Two stages need to ask "which class does this image look like?":

- sample, for the VQ-VAE-2 paper's classifier-based rejection: draw more samples than needed and
  keep the ones a classifier trained on real images assigns to the requested class most confidently;
- evaluate, for the Classification Accuracy Score (CAS, Ravuri & Vinyals 2019): train a classifier
  on generated images only and test it on real held-out images. If the samples carry the features
  that define each class, the score approaches that of the same classifier trained on real images.

The network is deliberately small (a few strided conv blocks on images resized to 32 x 32) so that
both uses fit in a CPU budget; it is a measuring instrument, not a product. Its checkpoints are
plain state dicts and load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.config import without_neutral_defaults
from pipelines.data import storage
from pipelines.data.keys import smallest_by_key_hash
from pipelines.manifest import fingerprint

log = logging.getLogger("vqpipe")

FORMAT = "vqpipe.classifier/1"


@dataclass
class ClassifierConfig:
    num_classes: int
    in_channels: int = 3
    input_size: int = 32  # every image is resized to input_size x input_size first
    width: int = 16  # channels of the first block; doubled by each later strided block

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(
                f"a classifier needs at least 2 classes, got num_classes={self.num_classes}"
            )
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.input_size < 8 or self.input_size % 4:
            raise ValueError(
                f"input_size must be a multiple of 4 and at least 8, got {self.input_size}"
            )


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """B x C x H x W float images -> B x C x size x size (antialiased, so downsizing does not alias)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(
        images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )


def _conv_block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ImageClassifier(nn.Module):
    """Images in [-1, 1] (any size) -> class logits B x num_classes."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        w = config.width
        # Downsampling from the first layer keeps a training step cheap on a CPU; shapes and
        # colours survive it, and the receptive field at 1/8 covers the whole 32 x 32 input.
        self.features = nn.Sequential(
            _conv_block(config.in_channels, w, 2),  # 1/2
            _conv_block(w, w, 1),
            _conv_block(w, 2 * w, 2),  # 1/4
            _conv_block(2 * w, 2 * w, 1),
            _conv_block(2 * w, 4 * w, 2),  # 1/8
        )
        self.head = nn.Linear(4 * w, config.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The penultimate layer: globally pooled features B x (4 * width), the head's input."""
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected images B x {self.config.in_channels} x H x W, got {tuple(images.shape)}"
            )
        x = self.features(resize_images(images.float(), self.config.input_size))
        return x.mean(dim=(2, 3))

    def describe(self) -> str:
        """The architecture in one line, for reports."""
        w = self.config.width
        return (
            f"ImageClassifier: input resized to {self.config.input_size}x{self.config.input_size}, "
            f"5 conv3x3-BatchNorm-ReLU blocks ({w}, {w}, {2 * w}, {2 * w}, {4 * w} channels; "
            f"stride 2 in blocks 1, 3 and 5), global average pooling to {4 * w} features, a "
            f"linear head over {self.config.num_classes} classes"
        )


# -------------------------------------------------------------------------------------------------
# Data


@dataclass
class LabelledImages:
    """Float images N x C x H x W in [-1, 1], their int64 labels and their corpus keys."""

    images: torch.Tensor
    labels: torch.Tensor
    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, mask: np.ndarray | torch.Tensor) -> LabelledImages:
        mask = torch.as_tensor(mask, dtype=torch.bool)
        keys = [k for k, keep in zip(self.keys, mask.tolist()) if keep]
        return LabelledImages(self.images[mask], self.labels[mask], keys)


def labelled_images(dataset: Any, max_images: int, size: int | None = None) -> LabelledImages:
    """Gather at most ``max_images`` rows of a corpus dataset (columns key, image, label).

    The rows kept are the ``max_images`` with the smallest key hash, which is a deterministic,
    class-blind random subset; memory stays bounded by about twice that. Images are converted to
    [-1, 1] floats and, when ``size`` is given, resized to size x size as they arrive.
    """
    from pipelines.data.images import to_model_input

    if max_images <= 0:
        raise ValueError(f"max_images must be positive, got {max_images}")

    def rows():
        for batch in dataset.iter_batches(batch_size=256, batch_format="numpy"):
            pixels = batch["image"]
            if pixels.dtype == object:  # a ragged tensor column comes back as an array of arrays
                pixels = np.stack(list(pixels))
            x = to_model_input(pixels)
            if size is not None:
                x = resize_images(x, size)
            for key, label, image in zip(batch["key"], batch["label"], x):
                yield str(key), (int(label), image.clone())  # a view would keep its batch alive

    kept = smallest_by_key_hash(rows(), max_images)
    if not kept:
        return LabelledImages(torch.empty(0), torch.empty(0, dtype=torch.long), [])
    labels = torch.tensor([label for _, (label, _) in kept], dtype=torch.long)
    images = torch.stack([image for _, (_, image) in kept])
    return LabelledImages(images, labels, [key for key, _ in kept])


# -------------------------------------------------------------------------------------------------
# Training and prediction


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and shifts of up to 1/8 of the side, drawn per image.

    A class is a shape, not a position: without this a small classifier memorises where the
    objects of a few hundred training images happen to sit. (Rotations and rescaling were tried
    too; at a few hundred steps they cost more accuracy than they bought.)
    """
    b = images.shape[0]
    u = torch.rand(b, 3, generator=generator)
    flip = torch.where(u[:, 0] < 0.5, -1.0, 1.0)
    shift = (u[:, 1:] * 2 - 1) * 0.25  # grid coordinates span 2, so 0.25 is 1/8 of the side
    zero, one = torch.zeros(b), torch.ones(b)
    theta = torch.stack(
        [torch.stack([flip, zero, shift[:, 0]], 1), torch.stack([zero, one, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # Border padding repeats the background rather than inventing black edges.
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    config: ClassifierConfig | None = None,
) -> ImageClassifier:
    """Train an ImageClassifier for ``steps`` Adam steps on N x C x H x W images in [-1, 1].

    Deterministic for a given seed: the initial weights, the batch order and the augmentations all
    come from generators seeded here, and the process-wide RNG is left untouched.
    """
    if images.ndim != 4:
        raise ValueError(f"expected images N x C x H x W, got {tuple(images.shape)}")
    if len(images) != len(labels):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError("cannot train a classifier on zero images")
    labels = labels.long()
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got range [{int(labels.min())}, {int(labels.max())}]"
        )
    config = config or ClassifierConfig(num_classes=num_classes, in_channels=images.shape[1])
    if config.num_classes != num_classes or config.in_channels != images.shape[1]:
        raise ValueError(
            f"config is for {config.num_classes} classes x {config.in_channels} channels, data has "
            f"{num_classes} classes x {images.shape[1]} channels"
        )
    # Resize once up front: every step then works on small tensors.
    images = resize_images(images.float(), config.input_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ImageClassifier(config)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    order = torch.randperm(len(images), generator=generator)
    position = 0
    for _ in range(steps):
        if position + batch_size > len(order):  # next epoch; small datasets reuse images
            order = torch.randperm(len(images), generator=generator)
            position = 0
        idx = order[position : position + batch_size]
        position += batch_size
        logits = model(_augment(images[idx], generator))
        loss = F.cross_entropy(logits, labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


# The seed of the label-free feature network: fixed, so that its feature space is the same in every
# run and for every corpus of a given channel count, and runs can be compared.
RANDOM_FEATURES_SEED = 0


@dataclass(frozen=True)
class RandomFeatures:
    """A label-free feature space for a corpus without classes: the ImageClassifier network with
    its weights drawn once from a fixed seed (He-normal convolutions) and never trained (BatchNorm
    at its initial statistics), whose pooled penultimate activations are the features
    (``embed_images``).

    Random convolutional features keep what the real and generated images share in colour, edges
    and layout without training on labels, and depend on nothing the pipeline trained, so they
    cannot favour the autoencoder whose decoder made the samples (Naeem et al. 2020 measure
    precision and recall in such randomly initialised embeddings)."""

    model: ImageClassifier
    seed: int

    @classmethod
    def make(cls, in_channels: int, seed: int = RANDOM_FEATURES_SEED) -> RandomFeatures:
        # The head is unused; ClassifierConfig asks for two classes.
        config = ClassifierConfig(num_classes=2, in_channels=in_channels)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ImageClassifier(config)
            # He-normal weights keep the activations' scale through the blocks (PyTorch's default
            # initialisation shrinks it about threefold per block, features near 1e-3).
            for module in model.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        return cls(model.eval(), seed)

    def describe(self) -> str:
        w = self.model.config.width
        size = self.model.config.input_size
        return (
            f"a randomly initialised, untrained convolutional network (the ImageClassifier "
            f"architecture: input resized to {size}x{size}, 5 conv3x3-BatchNorm-ReLU blocks, "
            f"{w} to {4 * w} channels; He-normal weights from seed {self.seed}, the same in every "
            "run); "
            f"features: its {4 * w} pooled penultimate activations. The corpus has no labels to "
            "train a feature network on"
        )


@torch.inference_mode()
def predict_proba(
    model: ImageClassifier, images: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """Class probabilities N x num_classes for N x C x H x W images in [-1, 1]."""
    model.eval()
    device = next(model.parameters()).device
    if len(images) == 0:
        return torch.empty(0, model.config.num_classes)
    out = [
        F.softmax(model(images[i : i + batch_size].to(device)).float(), dim=1).cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out)


@torch.inference_mode()
def embed_images(model: ImageClassifier, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Penultimate-layer features N x D (float64 numpy) of N x C x H x W images in [-1, 1]."""
    model.eval()
    device = next(model.parameters()).device
    out = [
        model.embed(images[i : i + batch_size].to(device)).double().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out).numpy() if out else np.empty((0, 4 * model.config.width))


def predicted_classes(
    model: ImageClassifier, images: torch.Tensor, among: list[int] | None = None
) -> np.ndarray:
    """Per image, its most probable class (among ``among``, when given), as int64."""
    probs = predict_proba(model, images)
    if among is None:
        predicted = probs.argmax(dim=1)
    else:
        allowed = torch.tensor(sorted(among), dtype=torch.long)
        predicted = allowed[probs[:, allowed].argmax(dim=1)]
    return predicted.numpy().astype(np.int64)


def correct_predictions(
    model: ImageClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    among: list[int] | None = None,
) -> np.ndarray:
    """Per image, whether its most probable class (among ``among``, when given) is its label."""
    return predicted_classes(model, images, among) == labels.long().cpu().numpy()


def accuracy(
    model: ImageClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    among: list[int] | None = None,
) -> float:
    """Fraction of images whose most probable class is their label.

    With ``among``, the prediction is restricted to those classes: two classifiers, one of which
    only ever saw some classes, are then compared on the same question.
    """
    if len(images) == 0:
        raise ValueError("accuracy of zero images is undefined")
    return float(correct_predictions(model, images, labels, among).mean())


# -------------------------------------------------------------------------------------------------
# Persistence


def save_classifier(model: ImageClassifier, uri: str, key: str) -> None:
    """Write the classifier to ``uri``; ``key`` records what it was trained on (see corpus_classifier)."""
    buffer = io.BytesIO()
    torch.save(
        {
            "format": FORMAT,
            "config": dataclasses.asdict(model.config),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "key": key,
        },
        buffer,
    )
    storage.write_bytes(uri, buffer.getvalue())


def load_classifier(
    uri: str, map_location: str | torch.device = "cpu"
) -> tuple[ImageClassifier, str]:
    """(classifier in eval mode, its training key) from a file written by save_classifier."""
    payload = torch.load(
        io.BytesIO(storage.read_bytes(uri)), map_location=map_location, weights_only=True
    )
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{uri} is not a {FORMAT} file (format: {found!r})")
    model = ImageClassifier(ClassifierConfig(**payload["config"]))
    model.load_state_dict(payload["state_dict"])
    return model.to(map_location).eval(), payload["key"]


def corpus_classifier(
    data_cfg: Any,
    class_names: list[str],
    *,
    steps: int,
    lr: float,
    seed: int,
    max_images: int,
    cache_uri: str,
    reuse_uris: tuple[str, ...] = (),
) -> ImageClassifier:
    """A classifier trained on the real corpus' train split, loaded from a cache when possible.

    The cache key covers everything the weights depend on (data config, class names and the
    training settings), so a classifier is reused (from ``cache_uri`` or any of ``reuse_uris``,
    e.g. another stage's copy) only when training again would reproduce it.
    """
    from pipelines.data.corpus import open_corpus

    base = ClassifierConfig(num_classes=len(class_names), in_channels=data_cfg.channels)
    key = fingerprint(
        "corpus_classifier",
        without_neutral_defaults("data", data_cfg.model_dump(mode="json")),
        list(class_names),
        dataclasses.asdict(base),
        {"steps": steps, "lr": lr, "seed": seed, "max_images": max_images},
    )
    for uri in (cache_uri, *reuse_uris):
        if storage.exists(uri):
            model, stored_key = load_classifier(uri)
            if stored_key == key:
                log.info("reusing the real-image classifier at %s", uri)
                if uri != cache_uri:
                    save_classifier(model, cache_uri, key)
                return model
    corpus = open_corpus(data_cfg)
    if list(corpus.class_names) != list(class_names):
        raise ValueError(
            f"the corpus now has classes {list(corpus.class_names)}, but the models were trained on "
            f"{list(class_names)}; re-run the pipeline from train_vqvae"
        )
    train = labelled_images(corpus.dataset("train"), max_images, size=base.input_size)
    if len(train) == 0:
        raise ValueError(
            f"the train split of {data_cfg.source!r} is empty; cannot train a classifier"
        )
    log.info("training the real-image classifier on %d images for %d steps", len(train), steps)
    model = train_classifier(
        train.images, train.labels, len(class_names), steps=steps, lr=lr, seed=seed, config=base
    )
    save_classifier(model, cache_uri, key)
    return model
