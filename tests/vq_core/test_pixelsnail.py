"""PixelSNAIL prior: causality with and without attention and conditioning, no blind spot, the
loss, dropout, checkpoints and learning (class-conditional top prior, code-conditioned bottom
prior). The input checks shared with the Gated PixelCNN are tested in test_pixelcnn.py."""

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
    assert_no_blind_spot,
    check_learns_class_conditional_stripes,
    conditioning,
    fit,
)
from vq_core.checkpoint import load_checkpoint, save_checkpoint
from vq_core.pixelsnail import PixelSNAIL, PixelSNAILConfig


def snail(attention: bool = True, conditioned: bool = False, **overrides) -> PixelSNAIL:
    fields = dict(
        channels=16,
        num_blocks=2,
        res_blocks=1,
        attention=attention,
        num_heads=2,
        attention_channels=8,
        condition_channels=8,
        condition_res_blocks=1,
    )
    fields.update(CONDITION if conditioned else {})
    fields.update(overrides)
    torch.manual_seed(0)
    return PixelSNAIL(PixelSNAILConfig(K, H, W, **fields))


@pytest.mark.parametrize("attention", [True, False])
@pytest.mark.parametrize("conditioned", [False, True])
def test_logits_depend_only_on_earlier_codes(attention, conditioned):
    assert_causal(snail(attention, conditioned))


@pytest.mark.parametrize("attention", [True, False])
def test_last_position_sees_every_earlier_position(attention):
    # Attention sees everything before; without it the two convolution streams must cover the
    # whole past (a single down-right stream would miss the area above and to the right).
    assert_no_blind_spot(snail(attention, num_blocks=2 if attention else 3))


def test_shapes_and_dtypes():
    prior = snail(True, True)
    labels, condition = conditioning(prior, 4)
    codes = torch.randint(0, K, (4, H, W))
    logits = prior(codes, labels, condition)
    assert logits.shape == (4, K, H, W) and logits.dtype == torch.float32
    samples = prior.sample(4, labels, condition, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (4, H, W) and samples.dtype == torch.long
    assert ((samples >= 0) & (samples < K)).all()


def test_dropout_acts_only_in_training_mode():
    prior = snail(True, dropout=0.5)
    codes = torch.randint(0, K, (2, H, W))
    prior.train()
    assert not torch.equal(prior(codes), prior(codes))
    prior.eval()
    assert torch.equal(prior(codes), prior(codes))


def test_checkpoint_round_trip_keeps_the_logits():
    prior = snail(True, True).eval()
    labels, condition = conditioning(prior, 2)
    codes = torch.randint(0, K, (2, H, W))
    buffer = io.BytesIO()
    save_checkpoint(prior, buffer)
    buffer.seek(0)
    loaded, _ = load_checkpoint(buffer)
    assert isinstance(loaded, PixelSNAIL) and loaded.config == prior.config
    with torch.no_grad():
        assert torch.equal(loaded(codes, labels, condition), prior(codes, labels, condition))


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(num_heads=3), r"attention_channels \(8\) must be a multiple of num_heads \(3\)"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
        (dict(num_blocks=0), "num_blocks must be an integer >= 1, got 0"),
        (dict(attention="yes"), "attention must be True or False, got 'yes'"),
        (dict(kernel_size=2), "kernel_size must be an integer >= 3, got 2"),
        (dict(channels=0), "channels must be an integer >= 1, got 0"),
    ],
)
def test_config_rejects_bad_values(fields, match):
    base = dict(num_codes=K, height=H, width=W, attention_channels=8, num_heads=2)
    base.update(fields)
    with pytest.raises(ValueError, match=match):
        PixelSNAILConfig(**base)


def test_learns_class_conditional_stripes():
    torch.manual_seed(0)
    config = PixelSNAILConfig(
        STRIPE_CODES,
        STRIPE_SIZE,
        STRIPE_SIZE,
        channels=32,
        num_blocks=2,
        res_blocks=1,
        num_heads=2,
        attention_channels=16,
        dropout=0.0,
        num_classes=STRIPE_CLASSES,
    )
    check_learns_class_conditional_stripes(PixelSNAIL(config))


def test_bottom_prior_uses_the_top_codes():
    # Bottom codes are the top codes upsampled x2. Without the condition the best possible is
    # 1 bit per code (one fresh uniform code of 16 per 2x2 patch); with it, close to 0.
    g = torch.Generator().manual_seed(0)
    top = torch.randint(0, 16, (1280, 4, 4), generator=g)
    bottom = top.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    torch.manual_seed(0)
    config = PixelSNAILConfig(
        16,
        8,
        8,
        channels=32,
        num_blocks=1,
        res_blocks=1,
        attention=False,
        dropout=0.0,
        condition_num_codes=16,
        condition_height=4,
        condition_width=4,
        condition_channels=32,
        condition_res_blocks=1,
    )
    prior = fit(PixelSNAIL(config), bottom[:1024], condition=top[:1024], steps=150)
    with torch.no_grad():
        bits = prior.loss(bottom[1024:], condition=top[1024:]).item()
    assert bits < 0.5, f"held-out {bits:.2f} bits per code"
    assert bits < 0.5 * math.log2(16)
    samples = prior.sample(8, condition=top[1024:1032], generator=torch.Generator().manual_seed(0))
    assert (samples == bottom[1024:1032]).float().mean() > 0.9


@pytest.mark.parametrize("condition_res_blocks", [0, 1])
def test_changing_one_top_code_changes_the_bottom_logits_under_it(condition_res_blocks):
    # The bottom prior reads the top map: changing one top code must change the predicted
    # distribution over the 2 x 2 bottom patch that code covers, at every position of the patch.
    torch.manual_seed(0)
    config = PixelSNAILConfig(
        16,
        8,
        8,
        channels=16,
        num_blocks=1,
        res_blocks=1,
        attention=False,
        condition_num_codes=16,
        condition_height=4,
        condition_width=4,
        condition_channels=8,
        condition_res_blocks=condition_res_blocks,
    )
    prior = PixelSNAIL(config).eval()
    g = torch.Generator().manual_seed(0)
    top = torch.randint(0, 16, (1, 4, 4), generator=g)
    bottom = torch.randint(0, 16, (1, 8, 8), generator=g)
    changed = top.clone()
    changed[0, 2, 1] = (top[0, 2, 1] + 1) % 16
    with torch.no_grad():
        difference = (prior(bottom, condition=changed) - prior(bottom, condition=top)).abs()
    difference = difference.amax(dim=1)[0]
    patch = difference[4:6, 2:4]
    assert (patch > 1e-4).all(), patch
    if condition_res_blocks == 0:
        # Without the condition stack's convolutions a top code enters the network only at the
        # patch it covers, so nothing before the patch's first position in raster order can
        # change: a condition map placed one cell off would fail here.
        assert torch.count_nonzero(difference.flatten()[: 4 * 8 + 2]) == 0
