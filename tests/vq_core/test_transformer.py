"""Transformer prior: causality with and without conditioning, labels and the condition map reaching
every position, cached sampling equal to the naive reference, the loss, dropout, weight tying,
checkpoints, config checks and learning (class-conditional stripes, a bottom prior reading its top
codes). Sampling across levels is tested with the other priors in test_sampling_levels.py."""

from __future__ import annotations

import io
import math

import pytest
import torch

from tests.vq_core.test_pixelcnn import (
    CONDITION,
    STRIPE_CLASSES,
    STRIPE_CODES,
    STRIPE_SIZE,
    H,
    K,
    W,
    assert_causal,
    assert_labels_and_condition_reach_every_position,
    assert_no_blind_spot,
    conditioning,
    fit,
    pattern_class,
    stripe_codes,
)
from tests.vq_core.test_sampling import sample_both_ways
from vq_core.checkpoint import load_checkpoint, save_checkpoint
from vq_core.pixelcnn import bits_per_code
from vq_core.transformer import TransformerPrior, TransformerPriorConfig


def transformer(conditioned: bool = False, **overrides) -> TransformerPrior:
    fields = dict(
        channels=16, num_layers=2, num_heads=2, condition_channels=8, condition_res_blocks=1
    )
    fields.update(CONDITION if conditioned else {})
    fields.update(overrides)
    torch.manual_seed(0)
    return TransformerPrior(TransformerPriorConfig(K, H, W, **fields))


@pytest.mark.parametrize("conditioned", [False, True])
def test_logits_depend_only_on_earlier_codes(conditioned):
    # Logits at q change with the code at p only when p < q; every code moves some later logit.
    assert_causal(transformer(conditioned))


def test_last_position_sees_every_earlier_position():
    assert_no_blind_spot(transformer(num_layers=1))


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_labels_and_condition_reach_every_position(tie_embeddings):
    assert_labels_and_condition_reach_every_position(
        transformer(True, tie_embeddings=tie_embeddings)
    )


def test_a_condition_code_reaches_no_position_before_the_patch_it_covers():
    # Without the condition stack's convolutions a top code enters only at the positions of the
    # patch it covers (its own prediction included) and, through attention, at later ones: a
    # condition map placed one position off would move the logits before the patch.
    prior = transformer(
        num_classes=0, condition_num_codes=5, condition_height=5, condition_width=3,
        condition_res_blocks=0,
    ).eval()  # fmt: skip
    _, condition = conditioning(prior, 1)
    codes = torch.randint(0, K, (1, H, W))
    changed = condition.clone()
    changed[0, 2, 1] = (condition[0, 2, 1] + 1) % 5  # covers row 2, columns 2 and 3 (W/3 = 2)
    with torch.no_grad():
        difference = (prior(codes, condition=changed) - prior(codes, condition=condition)).abs()
    difference = difference.amax(dim=1)[0].flatten()
    first = 2 * W + 2
    assert torch.count_nonzero(difference[:first]) == 0
    assert (difference[first : first + 2] > 1e-6).all()


VARIANTS = {
    "unconditional": lambda: transformer(False),
    "class": lambda: transformer(False, num_classes=3),
    "class-and-condition": lambda: transformer(True),
    "condition-only": lambda: transformer(
        False, condition_num_codes=5, condition_height=5, condition_width=3
    ),
    "untied-dropout": lambda: transformer(True, tie_embeddings=False, dropout=0.3),
    "one-column": lambda: TransformerPrior(
        TransformerPriorConfig(K, 4, 1, channels=8, num_layers=1, num_heads=2, num_classes=2)
    ),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_sampling_matches_naive(variant):
    torch.manual_seed(0)
    prior = VARIANTS[variant]()
    (naive_codes, naive_logits), (cached_codes, cached_logits) = sample_both_ways(prior)
    cfg = prior.config
    assert cached_logits.shape == (3, cfg.height * cfg.width, K)
    assert torch.allclose(cached_logits, naive_logits, atol=1e-5, rtol=0)
    assert torch.equal(cached_codes, naive_codes)
    assert naive_codes.unique().numel() > 1  # the draws varied
    assert prior.training  # the sampler restored the mode it found


def test_shapes_dtypes_and_loss_in_bits():
    prior = transformer(True).eval()
    labels, condition = conditioning(prior, 4)
    codes = torch.randint(0, K, (4, H, W))
    logits = prior(codes, labels, condition)
    assert logits.shape == (4, K, H, W) and logits.dtype == torch.float32
    expected = torch.nn.functional.cross_entropy(logits, codes) / math.log(2)
    assert torch.allclose(prior.loss(codes, labels, condition), expected)
    assert torch.allclose(bits_per_code(logits, codes), expected)
    # Narrower integer codes (as code shards store them) are accepted.
    assert torch.equal(prior(codes.to(torch.int16), labels, condition), logits)
    # Uniform logits cost log2(K) bits per code.
    with torch.no_grad():
        prior.norm.weight.zero_()
        prior.head.bias.zero_()
    assert prior.loss(codes, labels, condition).item() == pytest.approx(math.log2(K))


def test_dropout_acts_only_in_training_mode():
    prior = transformer(dropout=0.5)
    codes = torch.randint(0, K, (2, H, W))
    prior.train()
    assert not torch.equal(prior(codes), prior(codes))
    prior.eval()
    assert torch.equal(prior(codes), prior(codes))


def test_tied_head_is_the_code_embedding():
    tied, untied = transformer(tie_embeddings=True), transformer(tie_embeddings=False)
    assert tied.head.weight is tied.embedding.weight
    assert untied.head.weight is not untied.embedding.weight
    count = sum(p.numel() for p in tied.parameters())
    assert count == sum(p.numel() for p in untied.parameters()) - K * 16


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_checkpoint_round_trip_keeps_the_logits_and_the_tie(tie_embeddings):
    prior = transformer(True, tie_embeddings=tie_embeddings).eval()
    labels, condition = conditioning(prior, 2)
    codes = torch.randint(0, K, (2, H, W))
    buffer = io.BytesIO()
    save_checkpoint(prior, buffer)
    buffer.seek(0)
    loaded, _ = load_checkpoint(buffer)
    assert isinstance(loaded, TransformerPrior) and loaded.config == prior.config
    assert (loaded.head.weight is loaded.embedding.weight) == tie_embeddings
    with torch.no_grad():
        assert torch.equal(loaded(codes, labels, condition), prior(codes, labels, condition))


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(num_heads=3), r"channels \(16\) must be a multiple of num_heads \(3\)"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
        (dict(dropout="0.1"), "dropout must be a number, got '0.1'"),
        (dict(num_layers=0), "num_layers must be an integer >= 1, got 0"),
        (dict(mlp_ratio=1.5), "mlp_ratio must be an integer >= 1, got 1.5"),
        (dict(tie_embeddings="yes"), "tie_embeddings must be True or False, got 'yes'"),
        (dict(channels=0), "channels must be an integer >= 1, got 0"),
        (dict(num_codes=1), "num_codes must be an integer >= 2, got 1"),
        (
            dict(condition_num_codes=4, condition_height=2, condition_width=3),
            r"condition map \(2x3\) must divide the code map \(5x6\)",
        ),
    ],
)
def test_config_rejects_bad_values(fields, match):
    base = dict(num_codes=K, height=H, width=W, channels=16, num_heads=2)
    base.update(fields)
    with pytest.raises(ValueError, match=match):
        TransformerPriorConfig(**base)


def test_learns_class_conditional_stripes():
    # A short training run brings held-out bits per code well below log2(K), and the class is
    # what lowers them: the same codes under the wrong labels cost far more.
    train_codes, train_labels = stripe_codes(2048, seed=0)
    held_codes, held_labels = stripe_codes(256, seed=1)
    torch.manual_seed(0)
    config = TransformerPriorConfig(
        STRIPE_CODES, STRIPE_SIZE, STRIPE_SIZE, channels=32, num_layers=2, num_heads=2,
        dropout=0.0, num_classes=STRIPE_CLASSES,
    )  # fmt: skip
    prior = fit(TransformerPrior(config), train_codes, train_labels, steps=150, batch=32)
    with torch.no_grad():
        bits = prior.loss(held_codes, held_labels).item()
        wrong = prior.loss(held_codes, (held_labels + 1) % STRIPE_CLASSES).item()
    assert bits < 0.5 * math.log2(STRIPE_CODES), f"held-out {bits:.2f} bits per code"
    assert wrong > bits + 1.0, (bits, wrong)
    # Samples follow their class far above chance (1/3). The checkerboard class is the slowest to
    # learn (its parity is not a sum of a row and a column embedding), so the bar is overall.
    labels = torch.arange(STRIPE_CLASSES).repeat_interleave(8)
    samples = prior.sample(len(labels), labels, generator=torch.Generator().manual_seed(0))
    assert (pattern_class(samples) == labels).float().mean() >= 0.6, pattern_class(samples)


def test_bottom_prior_uses_the_top_codes():
    # Bottom codes are the top codes upsampled x2. Without the condition the best possible is
    # 1 bit per code (one fresh uniform code of 16 per 2x2 patch); with it, close to 0.
    g = torch.Generator().manual_seed(0)
    top = torch.randint(0, 16, (1280, 4, 4), generator=g)
    bottom = top.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    torch.manual_seed(0)
    config = TransformerPriorConfig(
        16, 8, 8, channels=32, num_layers=1, num_heads=2, dropout=0.0,
        condition_num_codes=16, condition_height=4, condition_width=4,
        condition_channels=32, condition_res_blocks=0,
    )  # fmt: skip
    prior = fit(TransformerPrior(config), bottom[:1024], condition=top[:1024], steps=100, batch=32)
    with torch.no_grad():
        bits = prior.loss(bottom[1024:], condition=top[1024:]).item()
    assert bits < 0.5, f"held-out {bits:.2f} bits per code"
    samples = prior.sample(8, condition=top[1024:1032], generator=torch.Generator().manual_seed(0))
    assert (samples == bottom[1024:1032]).float().mean() > 0.9
