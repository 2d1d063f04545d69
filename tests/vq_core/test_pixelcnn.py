"""Gated PixelCNN prior, and the input checks and loss that every vq_core prior shares.

Helpers at the top (causality probe, synthetic striped codes, a short training loop) are also
used by test_pixelsnail.py."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from vq_core.checkpoint import load_checkpoint, save_checkpoint
from vq_core.pixelcnn import GatedPixelCNN, GatedPixelCNNConfig, bits_per_code
from vq_core.pixelsnail import PixelSNAIL, PixelSNAILConfig

K, H, W = 7, 5, 6  # a non-square map, so rows and columns cannot be confused
CONDITION = dict(num_classes=3, condition_num_codes=5, condition_height=5, condition_width=3)


def pixelcnn(conditioned: bool = False, **overrides) -> GatedPixelCNN:
    fields = dict(channels=16, num_layers=3, kernel_size=3, condition_channels=8)
    fields.update(CONDITION if conditioned else {})
    fields.update(overrides)
    torch.manual_seed(0)
    return GatedPixelCNN(GatedPixelCNNConfig(K, H, W, **fields))


def conditioning(prior, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cfg = prior.config
    labels = torch.randint(0, cfg.num_classes, (n,), generator=g) if cfg.num_classes else None
    condition = None
    if cfg.condition_num_codes:
        shape = (n, cfg.condition_height, cfg.condition_width)
        condition = torch.randint(0, cfg.condition_num_codes, shape, generator=g)
    return labels, condition


def dependence(prior) -> torch.Tensor:
    """P x P matrix (P = h*w): entry [p, q] is how much the logits at q move when the code at p
    changes (raster order). Computed in float64, so "no dependence" is 0 up to rounding."""
    prior = copy.deepcopy(prior).double().eval()
    cfg = prior.config
    positions = cfg.height * cfg.width
    g = torch.Generator().manual_seed(1)
    base = torch.randint(0, cfg.num_codes, (1, cfg.height, cfg.width), generator=g)
    changed = base.repeat(positions, 1, 1).view(positions, -1)
    index = torch.arange(positions)
    changed[index, index] = (changed[index, index] + 1) % cfg.num_codes
    labels, condition = conditioning(prior, 1)
    with torch.no_grad():
        reference = prior(base, labels, condition).flatten(2)
        if labels is not None:
            labels = labels.expand(positions)
        if condition is not None:
            condition = condition.expand(positions, -1, -1)
        logits = prior(changed.view(-1, cfg.height, cfg.width), labels, condition).flatten(2)
    return (logits - reference).abs().amax(dim=1)


def assert_causal(prior) -> None:
    change = dependence(prior)
    positions = change.shape[0]
    for p in range(positions):
        assert change[p, : p + 1].max() < 1e-9, f"logits at or before {p} depend on code {p}"
        if p < positions - 1:
            assert change[p, p + 1 :].max() > 1e-4, f"no later logit depends on code {p}"


def assert_no_blind_spot(prior) -> None:
    change = dependence(prior)
    last = change.shape[0] - 1
    unseen = [p for p in range(last) if change[p, last] < 1e-9]
    assert not unseen, f"the last position does not see positions {unseen}"


# Synthetic codes: per class a pattern of two random codes, with a few codes replaced by noise.
#   class 0: horizontal stripes (rows constant), 1: vertical stripes, 2: checkerboard.
STRIPE_CODES, STRIPE_SIZE, STRIPE_CLASSES = 16, 8, 3


def stripe_codes(n: int, seed: int, noise: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k, s = STRIPE_CODES, STRIPE_SIZE
    labels = torch.randint(0, STRIPE_CLASSES, (n,), generator=g)
    first = torch.randint(0, k, (n, 1, 1), generator=g)
    second = (first + torch.randint(1, k, (n, 1, 1), generator=g)) % k
    rows, cols = torch.arange(s).view(s, 1), torch.arange(s).view(1, s)
    patterns = torch.stack([(rows + 0 * cols) % 2, (0 * rows + cols) % 2, (rows + cols) % 2])
    codes = torch.where(patterns[labels].bool(), second, first)
    noisy = torch.rand(n, s, s, generator=g) < noise
    return torch.where(noisy, torch.randint(0, k, (n, s, s), generator=g), codes), labels


def pattern_class(codes: torch.Tensor) -> torch.Tensor:
    """Which stripe class each n x s x s code map looks like most."""
    along_rows = (codes[:, :, 1:] == codes[:, :, :-1]).float().mean(dim=(1, 2))
    along_cols = (codes[:, 1:, :] == codes[:, :-1, :]).float().mean(dim=(1, 2))
    diagonal = (codes[:, 1:, 1:] == codes[:, :-1, :-1]).float().mean(dim=(1, 2))
    return torch.stack([along_rows, along_cols, diagonal], dim=1).argmax(dim=1)


def fit(prior, codes, labels=None, condition=None, steps=200, lr=3e-3, batch=64, seed=0):
    torch.manual_seed(seed)
    optimiser = torch.optim.Adam(prior.parameters(), lr=lr)
    prior.train()
    for _ in range(steps):
        index = torch.randint(0, len(codes), (batch,))
        loss = prior.loss(
            codes[index],
            None if labels is None else labels[index],
            None if condition is None else condition[index],
        )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    prior.eval()
    return prior


def check_learns_class_conditional_stripes(prior) -> None:
    train_codes, train_labels = stripe_codes(2048, seed=0)
    held_codes, held_labels = stripe_codes(256, seed=1)
    assert (pattern_class(train_codes) == train_labels).all()  # the check itself works
    fit(prior, train_codes, train_labels)
    with torch.no_grad():
        bits = prior.loss(held_codes, held_labels).item()
    assert bits < 0.5 * math.log2(STRIPE_CODES), f"held-out {bits:.2f} bits per code"

    labels = torch.arange(STRIPE_CLASSES).repeat_interleave(8)
    samples = prior.sample(len(labels), labels, generator=torch.Generator().manual_seed(0))
    looks_like = pattern_class(samples)
    for c in range(STRIPE_CLASSES):
        assert (looks_like[labels == c] == c).float().mean() >= 0.6, (c, looks_like)


# --------------------------------------------------------------------------- causality


@pytest.mark.parametrize("conditioned", [False, True])
def test_logits_depend_only_on_earlier_codes(conditioned):
    assert_causal(pixelcnn(conditioned))


def test_deep_enough_stack_has_no_blind_spot():
    # Vertical kernels widen the view by kernel_size//2 columns per layer; 3 layers of 5 cover
    # the 6 columns, so the last position must see every earlier one.
    assert_no_blind_spot(pixelcnn(num_layers=3, kernel_size=5))


def assert_labels_and_condition_reach_every_position(prior) -> None:
    """Another label, or another condition map, moves the logits at every position."""
    prior.eval()
    codes = torch.randint(0, K, (1, H, W))
    labels, condition = conditioning(prior, 1)
    with torch.no_grad():
        logits = prior(codes, labels, condition)
        other_label = prior(codes, (labels + 1) % 3, condition)
        other_condition = prior(codes, labels, (condition + 1) % 5)
    assert ((other_label - logits).abs().amax(dim=1) > 1e-6).all()
    assert ((other_condition - logits).abs().amax(dim=1) > 1e-6).all()


def test_labels_and_condition_reach_every_position():
    assert_labels_and_condition_reach_every_position(pixelcnn(True))


# --------------------------------------------------------------------------- shapes and loss


def test_shapes_and_dtypes():
    prior = pixelcnn(True)
    labels, condition = conditioning(prior, 4)
    codes = torch.randint(0, K, (4, H, W))
    logits = prior(codes, labels, condition)
    assert logits.shape == (4, K, H, W) and logits.dtype == torch.float32
    samples = prior.sample(4, labels, condition, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (4, H, W) and samples.dtype == torch.long
    assert ((samples >= 0) & (samples < K)).all()
    # Narrower integer codes (as code shards store them) are accepted.
    assert torch.equal(prior(codes.to(torch.int16), labels, condition), logits)


@pytest.mark.parametrize("builder", ["pixelcnn", "pixelsnail"])
def test_loss_is_in_bits_per_code(builder):
    prior = (pixelcnn(True) if builder == "pixelcnn" else snail_prior()).eval()  # no dropout
    labels, condition = conditioning(prior, 3)
    codes = torch.randint(0, K, (3, H, W))
    logits = prior(codes, labels, condition)
    expected = torch.nn.functional.cross_entropy(logits, codes) / math.log(2)
    assert torch.allclose(prior.loss(codes, labels, condition), expected)
    assert torch.allclose(bits_per_code(logits, codes), expected)
    # Uniform logits cost log2(K) bits per code.
    last = prior.head[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    assert prior.loss(codes, labels, condition).item() == pytest.approx(math.log2(K))


def snail_prior() -> PixelSNAIL:
    torch.manual_seed(0)
    config = PixelSNAILConfig(
        K, H, W, channels=16, num_blocks=1, res_blocks=1, num_heads=2, attention_channels=8,
        condition_channels=8, **CONDITION,
    )  # fmt: skip
    return PixelSNAIL(config)


def test_checkpoint_round_trip_keeps_the_logits():
    prior = pixelcnn(True).eval()
    labels, condition = conditioning(prior, 2)
    codes = torch.randint(0, K, (2, H, W))
    buffer = io.BytesIO()
    save_checkpoint(prior, buffer)
    buffer.seek(0)
    loaded, _ = load_checkpoint(buffer)
    assert isinstance(loaded, GatedPixelCNN) and loaded.config == prior.config
    with torch.no_grad():
        assert torch.equal(loaded(codes, labels, condition), prior(codes, labels, condition))


# --------------------------------------------------------------------------- input checks


@pytest.mark.parametrize("builder", ["pixelcnn", "pixelsnail"])
@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(labels=None), ValueError, r"class-conditional \(num_classes=3\)"),
        (dict(labels=torch.tensor([0, 3])), ValueError, r"labels must lie in \[0, 2\].*3"),
        (dict(labels=torch.tensor([0, -1])), ValueError, r"labels must lie in \[0, 2\].*-1"),
        (dict(labels=torch.tensor([0])), ValueError, r"labels must have shape \(2,\)"),
        (dict(labels=torch.tensor([0.0, 1.0])), TypeError, "labels must be an integer tensor"),
        (dict(condition=None), ValueError, r"condition_num_codes=5.*\(2, 5, 3\)"),
        (dict(condition=torch.zeros(2, 3, 5).long()), ValueError, r"\(2, 5, 3\), got \(2, 3, 5\)"),
        (dict(condition=torch.full((2, 5, 3), 5)), ValueError, r"condition must lie in \[0, 4\]"),
        (dict(codes=torch.full((2, H, W), K)), ValueError, r"codes must lie in \[0, 6\].*7"),
        (dict(codes=torch.zeros(2, W, H).long()), ValueError, r"B x 5 x 6, got \(2, 6, 5\)"),
        (dict(codes=torch.zeros(2, H, W)), TypeError, "codes must be an integer tensor"),
    ],
)
def test_bad_inputs_raise_naming_the_value(builder, change, error, match):
    prior = pixelcnn(True) if builder == "pixelcnn" else snail_prior()
    labels, condition = conditioning(prior, 2)
    inputs = dict(codes=torch.zeros(2, H, W).long(), labels=labels, condition=condition)
    inputs.update(change)
    with pytest.raises(error, match=match):
        prior(inputs["codes"], inputs["labels"], inputs["condition"])
    if "codes" not in change:  # sampling checks labels and condition the same way
        with pytest.raises(error, match=match):
            prior.sample(2, inputs["labels"], inputs["condition"])


def test_unexpected_labels_or_condition_raise():
    prior = pixelcnn(False)
    codes = torch.zeros(2, H, W).long()
    with pytest.raises(ValueError, match="unconditional"):
        prior(codes, labels=torch.zeros(2).long())
    with pytest.raises(ValueError, match="no condition map"):
        prior(codes, condition=torch.zeros(2, 5, 3).long())


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(num_codes=1), "num_codes must be an integer >= 2, got 1"),
        (dict(kernel_size=4), "kernel_size must be odd, got 4"),
        (dict(kernel_size=1), "kernel_size must be an integer >= 3, got 1"),
        (dict(num_layers=0), "num_layers must be an integer >= 1, got 0"),
        (dict(height=0), "height must be an integer >= 1, got 0"),
        (dict(num_classes=-1), "num_classes must be an integer >= 0, got -1"),
        (
            dict(condition_num_codes=4, condition_height=2, condition_width=4),
            r"condition map \(2x4\) must divide the code map \(5x6\)",
        ),
        (dict(condition_num_codes=4), "condition_height must be an integer >= 1, got 0"),
    ],
)
def test_config_rejects_bad_values(fields, match):
    base = dict(num_codes=K, height=H, width=W)
    base.update(fields)
    with pytest.raises(ValueError, match=match):
        GatedPixelCNNConfig(**base)


def test_model_needs_its_own_config_class():
    with pytest.raises(TypeError, match="GatedPixelCNNConfig"):
        GatedPixelCNN(PixelSNAILConfig(K, H, W))


# --------------------------------------------------------------------------- learning


def test_learns_class_conditional_stripes():
    torch.manual_seed(0)
    prior = GatedPixelCNN(
        GatedPixelCNNConfig(
            STRIPE_CODES,
            STRIPE_SIZE,
            STRIPE_SIZE,
            channels=32,
            num_layers=4,
            kernel_size=3,
            num_classes=STRIPE_CLASSES,
        )
    )
    check_learns_class_conditional_stripes(prior)
