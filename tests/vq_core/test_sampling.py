"""Sampling: logit filtering, seeded draws, the causal convolution's footprints and step mode, and
the cached sampler agreeing with the naive reference for every prior variant."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tests.vq_core.test_pixelcnn import CONDITION, conditioning
from vq_core.pixelcnn import GatedPixelCNN, GatedPixelCNNConfig
from vq_core.pixelsnail import PixelSNAIL, PixelSNAILConfig
from vq_core.sampling import (
    METHODS,
    CausalConv2d,
    PointwiseConv,
    StepCache,
    crop,
    draw_categorical,
    filter_logits,
    sample_codes,
)

K, H, W = 7, 5, 6  # a non-square map, so rows and columns cannot be confused


def snail(attention: bool, conditioned: bool, **overrides) -> PixelSNAIL:
    fields = dict(
        channels=16,
        num_blocks=2,
        res_blocks=1,
        attention=attention,
        num_heads=2,
        attention_channels=8,
        dropout=0.1,
        condition_channels=8,
        condition_res_blocks=1,
    )
    fields.update(CONDITION if conditioned else {})
    fields.update(overrides)
    return PixelSNAIL(PixelSNAILConfig(K, H, W, **fields))


def pixelcnn(conditioned: bool, **overrides) -> GatedPixelCNN:
    fields = dict(channels=16, num_layers=3, kernel_size=3, condition_channels=8)
    fields.update(CONDITION if conditioned else {})
    fields.update(overrides)
    return GatedPixelCNN(GatedPixelCNNConfig(K, H, W, **fields))


VARIANTS = {
    "snail-attention": lambda: snail(True, False),
    "snail-attention-class-condition": lambda: snail(True, True),
    "snail-plain": lambda: snail(False, False),
    "snail-plain-class-condition": lambda: snail(False, True),
    "snail-class-only": lambda: snail(True, False, num_classes=3),
    "pixelcnn": lambda: pixelcnn(False),
    "pixelcnn-class-condition": lambda: pixelcnn(True),
    "pixelcnn-condition-only": lambda: pixelcnn(
        False, condition_num_codes=5, condition_height=5, condition_width=3
    ),
}


# --------------------------------------------------------------------------- filter_logits


def test_temperature_divides_logits():
    logits = torch.tensor([[1.0, -2.0, 0.5]])
    assert torch.allclose(filter_logits(logits, temperature=2.0), logits / 2)


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0], [5.0, 4.0, 3.0, 2.0]])
    kept = filter_logits(logits, top_k=2).isfinite()
    assert kept.tolist() == [[False, True, False, True], [True, True, False, False]]
    assert filter_logits(logits, top_k=10).isfinite().all()  # k >= K keeps everything


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    # Ranked 0.5, 0.3, 0.15, 0.05: 0.75 needs the two largest, 0.85 the three largest.
    assert filter_logits(logits, top_p=0.75).isfinite().tolist() == [[False, True, False, True]]
    assert filter_logits(logits, top_p=0.85).isfinite().tolist() == [[False, True, True, True]]
    assert filter_logits(logits, top_p=1.0).isfinite().all()
    assert filter_logits(logits, top_p=1e-9).isfinite().tolist() == [[False, True, False, False]]
    # top_p=1 switches the nucleus off, even where the float32 running mass reaches 1 before
    # the last code (a "mass before >= top_p" test would drop the unlikely codes).
    assert filter_logits(torch.tensor([[100.0, 0.0, 0.0]]), top_p=1.0).isfinite().all()
    # A nucleus that reaches top_p exactly is complete: four equally likely codes (masses exact
    # in float32), top_p=0.5 keeps two of them, not three.
    assert filter_logits(torch.zeros(2, 4), top_p=0.5).isfinite().sum(dim=-1).tolist() == [2, 2]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=0.0),
        dict(temperature=-1.0),
        dict(temperature=math.nan),
        dict(temperature=math.inf),
        dict(top_k=0),
        dict(top_k=1.5),
        dict(top_k=True),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_p=-0.1),
        # Wrong types are refused with the same error, not a TypeError from a comparison.
        dict(temperature="1"),
        dict(top_p="0.5"),
    ],
)
def test_bad_filter_settings_raise_and_name_the_value(kwargs):
    ((name, value),) = kwargs.items()
    with pytest.raises(ValueError, match=name):
        filter_logits(torch.zeros(1, 4), **kwargs)


# --------------------------------------------------------------------------- draws


def test_seeded_draws_are_reproducible_and_follow_the_distribution():
    probs = torch.tensor([0.1, 0.6, 0.0, 0.3])
    logits = probs.log().expand(20000, 4)
    first = draw_categorical(logits, torch.Generator().manual_seed(3))
    again = draw_categorical(logits, torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    assert first.dtype == torch.long
    frequencies = torch.bincount(first, minlength=4).float() / len(first)
    assert frequencies[2] == 0  # a -inf logit is never drawn
    assert torch.allclose(frequencies, probs, atol=0.015)


def test_draws_without_a_generator_use_the_global_one():
    logits = torch.tensor([[0.0, -math.inf, 5.0]]).expand(100, 3)
    torch.manual_seed(0)
    first = draw_categorical(logits)
    torch.manual_seed(0)
    assert torch.equal(draw_categorical(logits), first)
    assert (first != 1).all()


# --------------------------------------------------------------------------- crop


def test_crop_takes_the_region_of_a_map_and_passes_per_image_values():
    # One-row and one-column maps are maps too, and are cropped like any other.
    for height, width in [(5, 6), (2, 1), (1, 2), (1, 1)]:
        t = torch.randn(2, 3, height, width)
        assert crop(t, None) is t
        for r in range(height):
            for region in [(r, r + 1, 0, width)] + [(r, r + 1, c, c + 1) for c in range(width)]:
                r0, r1, c0, c1 = region
                assert torch.equal(crop(t, region), t[:, :, r0:r1, c0:c1])
    # Per-image values (B x C x 1 x 1) apply at every position of any map.
    per_image = torch.randn(2, 3, 1, 1)
    for region in [(0, 1, 0, W), (H - 1, H, W - 1, W), (2, 3, 4, 5)]:
        assert torch.equal(crop(per_image, region), per_image)


# --------------------------------------------------------------------------- CausalConv2d


def expected_footprint(footprint: str, kh: int, kw: int, i: int, j: int) -> set[tuple[int, int]]:
    rows = {
        "vertical_strict": range(i - kh, i),
        "vertical": range(i - kh + 1, i + 1),
        "horizontal_strict": range(i - kh + 1, i + 1),
        "horizontal": range(i - kh + 1, i + 1),
    }[footprint]
    cols = {
        "vertical_strict": range(j - kw // 2, j + kw // 2 + 1),
        "vertical": range(j - kw // 2, j + kw // 2 + 1),
        "horizontal_strict": range(j - kw, j),
        "horizontal": range(j - kw + 1, j + 1),
    }[footprint]
    return {(r, c) for r in rows for c in cols if 0 <= r < H and 0 <= c < W}


@pytest.mark.parametrize("kernel", [(2, 3), (3, 5)])
@pytest.mark.parametrize("footprint", CausalConv2d.FOOTPRINTS)
def test_causal_conv_reads_exactly_its_documented_footprint(footprint, kernel):
    kh, kw = kernel
    conv = CausalConv2d(1, 1, (kh, kw), footprint)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    for i in range(H):
        for j in range(W):
            x = torch.zeros(1, 1, H, W, requires_grad=True)
            conv(x)[0, 0, i, j].backward()
            read = {tuple(p) for p in x.grad[0, 0].nonzero().tolist()}
            assert read == expected_footprint(footprint, kh, kw, i, j), (i, j)


def test_causal_conv_refuses_unknown_footprints_and_even_vertical_widths():
    with pytest.raises(ValueError, match="footprint must be one of.*got 'diagonal'"):
        CausalConv2d(1, 1, (2, 3), "diagonal")
    for footprint in ("vertical", "vertical_strict"):
        with pytest.raises(ValueError, match=f"a {footprint} convolution needs an odd kernel"):
            CausalConv2d(1, 1, (2, 4), footprint)
    CausalConv2d(1, 1, (2, 4), "horizontal")  # no centre column needed


def test_pointwise_conv_has_a_bias_and_equals_a_1x1_convolution():
    torch.manual_seed(0)
    conv = PointwiseConv(4, 6)
    assert conv.bias is not None and PointwiseConv(4, 6, bias=False).bias is None
    for shape in [(2, 4, 1, 1), (2, 4, 3, 5), (2, 4, 2, 1), (2, 4, 1, 2)]:
        x = torch.randn(shape)
        expected = torch.nn.functional.conv2d(x, conv.weight, conv.bias)
        torch.testing.assert_close(conv(x), expected)


@pytest.mark.parametrize("footprint", CausalConv2d.FOOTPRINTS)
def test_causal_conv_step_mode_matches_the_full_map(footprint):
    conv = CausalConv2d(3, 4, (2, 3), footprint)
    x = torch.randn(2, 3, H, W)
    full = conv(x)
    # One row at a time (as a vertical stack runs) and one position at a time (as a horizontal
    # stack runs). A "vertical" layer reads row i to the right of j, so it only runs by rows.
    rows, positions = StepCache(2, H, W), StepCache(2, H, W)
    for i in range(H):
        rows.row = i
        region = rows.row_region
        out = conv(x[:, :, i : i + 1], rows, region)
        assert torch.allclose(out, full[:, :, i : i + 1], atol=1e-6)
        for j in range(W if footprint != "vertical" else 0):
            positions.row, positions.col = i, j
            region = positions.position_region
            out = conv(x[:, :, i : i + 1, j : j + 1], positions, region)
            assert torch.allclose(out, full[:, :, i : i + 1, j : j + 1], atol=1e-6)


# --------------------------------------------------------------------------- cached == naive


def sample_both_ways(prior, n: int = 3):
    """(codes, logits) of the naive and the cached sampler, each from a generator seeded alike."""
    labels, condition = conditioning(prior, n)
    runs = {}
    for method in ("naive", "cached"):
        generator = torch.Generator().manual_seed(7)
        runs[method] = sample_codes(
            prior, n, labels, condition, generator=generator, method=method, return_logits=True
        )
    return runs["naive"], runs["cached"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_sampling_matches_naive(variant):
    torch.manual_seed(0)
    prior = VARIANTS[variant]()
    (naive_codes, naive_logits), (cached_codes, cached_logits) = sample_both_ways(prior)
    assert cached_logits.shape == (3, H * W, K)
    assert torch.allclose(cached_logits, naive_logits, atol=1e-4, rtol=0)
    assert torch.equal(cached_codes, naive_codes)
    # The samples are not degenerate: the draws actually varied.
    assert naive_codes.unique().numel() > 1


@pytest.mark.parametrize("size", [(1, 4), (3, 1), (3, 2)])
@pytest.mark.parametrize("model", [GatedPixelCNN, PixelSNAIL])
def test_cached_sampling_matches_naive_on_maps_one_or_two_codes_wide(model, size):
    fields = dict(channels=8, condition_channels=8, num_layers=2)
    if model is PixelSNAIL:
        fields = dict(channels=8, condition_channels=8, num_blocks=1, res_blocks=1, num_heads=2)
        fields.update(attention_channels=8, condition_res_blocks=1)
    # A condition map of the prior's own size: each position reads its own condition code.
    fields.update(condition_num_codes=5, condition_height=size[0], condition_width=size[1])
    torch.manual_seed(0)
    prior = model(model.config_class(K, *size, **fields))
    (naive_codes, naive_logits), (cached_codes, cached_logits) = sample_both_ways(prior)
    assert cached_codes.shape == (3, *size)
    assert torch.allclose(cached_logits, naive_logits, atol=1e-4, rtol=0)
    assert torch.equal(cached_codes, naive_codes)


class FixedPrior(nn.Module):
    """A prior with the same logits at every position, whatever the codes before it: its samples
    are independent draws. Counts the full-map passes it is asked for."""

    def __init__(self, logits: torch.Tensor, height: int = 4, width: int = 5) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)
        self.config = SimpleNamespace(height=height, width=width)
        self.full_passes = 0

    def check_conditioning(self, labels, condition, n):
        return labels, condition

    def forward(self, codes, labels=None, condition=None):
        self.full_passes += 1
        n, height, width = codes.shape
        return self.logits[None, :, None, None].expand(n, -1, height, width)

    def begin_sampling(self, n, labels, condition):
        return StepCache(n, self.config.height, self.config.width)

    def sampling_step(self, cache, row, col):
        return self.logits.expand(cache.batch, -1)

    def observe(self, cache, codes):
        cache.observed += 1


@pytest.mark.parametrize("method", METHODS)
def test_samples_follow_the_softmax_of_the_logits_over_the_temperature(method):
    probs = torch.tensor([0.1, 0.6, 0.0, 0.3])
    prior = FixedPrior(probs.log())

    def frequencies(**kwargs) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        codes = sample_codes(prior, 400, generator=generator, method=method, **kwargs)
        return torch.bincount(codes.flatten(), minlength=4).float() / codes.numel()

    # 8,000 draws each: the default temperature is 1, the prior's own distribution.
    torch.testing.assert_close(frequencies(), probs, atol=0.015, rtol=0)
    hot = probs.sqrt() / probs.sqrt().sum()  # softmax(log p / 2)
    torch.testing.assert_close(frequencies(temperature=2.0), hot, atol=0.015, rtol=0)


def test_cached_sampling_runs_no_full_pass_and_naive_one_per_position():
    prior = FixedPrior(torch.zeros(3))
    sample_codes(prior, 2, method="cached")
    assert prior.full_passes == 0
    sample_codes(prior, 2, method="naive")
    assert prior.full_passes == 4 * 5


def test_the_number_of_samples_is_an_integer_from_one():
    prior = FixedPrior(torch.zeros(3))
    for n in (0, -1, True, 2.0, "2"):
        with pytest.raises(ValueError, match="n "):
            sample_codes(prior, n)
    assert sample_codes(prior, 1).shape == (1, 4, 5)


def test_sampling_is_reproducible_with_a_seeded_generator():
    prior = snail(True, True)
    labels, condition = conditioning(prior, 4)

    def draw(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return prior.sample(4, labels, condition, generator=generator)

    first = draw(1)
    assert first.shape == (4, H, W) and first.dtype == torch.long
    assert ((first >= 0) & (first < K)).all()
    assert torch.equal(first, draw(1))
    assert not torch.equal(first, draw(2))


@pytest.mark.parametrize("method", ["cached", "naive"])
@pytest.mark.parametrize("greedy", [dict(top_k=1), dict(top_p=1e-6)])
def test_top_k_one_and_tiny_top_p_are_greedy(method, greedy):
    prior = pixelcnn(True)
    labels, condition = conditioning(prior, 2)
    codes, logits = sample_codes(
        prior,
        2,
        labels,
        condition,
        generator=torch.Generator().manual_seed(0),
        method=method,
        return_logits=True,
        **greedy,
    )
    assert torch.equal(codes.flatten(1), logits.argmax(dim=-1))
    # Greedy decoding ignores the random draws entirely.
    other = sample_codes(
        prior, 2, labels, condition, generator=torch.Generator().manual_seed(99), **greedy
    )
    assert torch.equal(codes, other)


def test_temperature_moves_samples_towards_the_mode():
    prior = pixelcnn(False)

    def run(temperature: float):
        generator = torch.Generator().manual_seed(0)
        return sample_codes(
            prior, 2, temperature=temperature, generator=generator, return_logits=True
        )

    warm, warm_logits = run(1.0)
    cold, cold_logits = run(1e-4)
    assert not torch.equal(warm.flatten(1), warm_logits.argmax(dim=-1))
    assert torch.equal(cold.flatten(1), cold_logits.argmax(dim=-1))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="fast"), "method"),
        (dict(temperature=0.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=2.0), "top_p"),
    ],
)
def test_bad_sampling_arguments_raise(kwargs, match):
    prior = pixelcnn(False)
    with pytest.raises(ValueError, match=match):
        prior.sample(2, **kwargs)
    with pytest.raises(ValueError, match="n "):
        prior.sample(0)


def test_sampling_runs_in_eval_mode_and_restores_training_mode():
    prior = snail(True, False, dropout=0.5)
    prior.train()
    generator = torch.Generator().manual_seed(0)
    a = prior.sample(2, generator=generator)
    assert prior.training
    prior.eval()
    b = prior.sample(2, generator=torch.Generator().manual_seed(0))
    assert not prior.training
    # Dropout was off in both runs, so they agree.
    assert torch.equal(a, b)


def test_steps_out_of_raster_order_are_refused():
    prior = pixelcnn(False).eval()
    with torch.inference_mode():
        cache = prior.begin_sampling(2, None, None)
        with pytest.raises(ValueError, match=r"raster order: expected position \(0, 0\)"):
            prior.sampling_step(cache, 0, 1)
        logits = prior.sampling_step(cache, 0, 0)
        assert logits.shape == (2, K)
        prior.observe(cache, logits.argmax(dim=-1))
        with pytest.raises(ValueError, match=r"expected position \(0, 1\).*got \(1, 0\)"):
            prior.sampling_step(cache, 1, 0)
