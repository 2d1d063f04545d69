"""Behaviour of the discrete VAE: VQ-model interface, Gumbel relaxation, KL term, schedules."""

from __future__ import annotations

import math

import pytest
import torch

from tests.vq_core.conftest import make_shapes
from vq_core.dvae import (
    DiscreteVAE,
    DiscreteVAEConfig,
    gumbel_temperature,
    kl_to_uniform,
    kl_weight_schedule,
)


def tiny_dvae(**overrides) -> DiscreteVAE:
    config = dict(
        in_channels=3,
        channels=16,
        res_blocks=1,
        res_channels=8,
        embed_dim=8,
        codebook_size=32,
        downsample=4,
    )
    config.update(overrides)
    return DiscreteVAE(DiscreteVAEConfig(**config))


@pytest.mark.parametrize("downsample", [4, 8])
@pytest.mark.parametrize("channels, size", [(1, (32, 48)), (3, (32, 32))])
def test_shapes_and_interface(downsample, channels, size):
    torch.manual_seed(0)
    model = tiny_dvae(in_channels=channels, downsample=downsample)
    h, w = size
    x = make_shapes(3, size=h, width=w, channels=channels)
    assert model.levels == ("codes",)
    assert model.codebook_sizes == (32,)
    assert model.downsample == (downsample,)
    assert model.code_shape(h, w) == ((h // downsample, w // downsample),)

    out = model(x)
    assert out.reconstruction.shape == x.shape
    assert set(out.terms) == {"reconstruction", "kl"}
    assert set(out.stats) == {"perplexity/codes", "usage/codes"}
    (codes,) = model.encode(x)
    assert codes.dtype == torch.long
    assert codes.shape == (3, h // downsample, w // downsample)
    assert model.decode_codes((codes,)).shape == x.shape


def test_encode_is_the_argmax_of_the_logits_without_autograd():
    torch.manual_seed(0)
    model = tiny_dvae()
    x = make_shapes(4)
    (codes,) = model.encode(x)
    assert not codes.requires_grad and codes.grad_fn is None
    with torch.no_grad():
        assert torch.equal(codes, model.logits(x).argmax(dim=1))


def test_eval_reconstruction_equals_decode_of_encode():
    torch.manual_seed(0)
    model = tiny_dvae()
    x = make_shapes(4, size=32, width=48)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(3):
        opt.zero_grad()
        model(x).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        reconstruction = model(x).reconstruction
    torch.testing.assert_close(model.decode_codes(model.encode(x)), reconstruction)


def test_training_samples_the_relaxation_and_eval_is_deterministic():
    torch.manual_seed(0)
    model = tiny_dvae()
    x = make_shapes(2)
    with torch.no_grad():
        a, b = model(x).reconstruction, model(x).reconstruction
        assert not torch.equal(a, b)  # fresh Gumbel noise on every training forward
        model.eval()
        assert torch.equal(model(x).reconstruction, model(x).reconstruction)


def test_gradients_reach_encoder_and_codebook():
    torch.manual_seed(0)
    model = tiny_dvae()
    model(make_shapes(4), temperature=0.5).loss.backward()
    assert model.encoder.conv.weight.grad.abs().sum() > 0
    assert model.to_logits.weight.grad.abs().sum() > 0
    assert model.codebook.weight.grad.abs().sum() > 0


def test_kl_to_uniform_is_the_entropy_gap():
    k = 16
    assert kl_to_uniform(torch.zeros(2, k, 3, 3)).item() == pytest.approx(0.0, abs=1e-6)
    # Nearly one-hot logits: entropy ~ 0, so the gap is ~ log K.
    peaked = torch.full((1, k, 2, 2), -30.0)
    peaked[:, 5] = 30.0
    assert kl_to_uniform(peaked).item() == pytest.approx(math.log(k), abs=1e-4)
    logits = torch.randn(3, k, 4, 4, generator=torch.Generator().manual_seed(0))
    q = logits.softmax(dim=1)
    entropy = -(q * q.log()).sum(dim=1).mean()
    assert kl_to_uniform(logits).item() == pytest.approx(math.log(k) - entropy.item(), abs=1e-5)


def test_kl_term_keeps_the_code_distribution_closer_to_uniform():
    x = make_shapes(64, seed=3)

    def final_kl(kl_weight: float) -> float:
        torch.manual_seed(0)
        model = tiny_dvae()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for step in range(40):
            batch = x[(step * 16) % 64 :][:16]
            opt.zero_grad()
            model(batch, kl_weight=kl_weight).loss.backward()
            opt.step()
        with torch.no_grad():
            return model(x).terms["kl"].item()

    without, with_kl = final_kl(0.0), final_kl(0.1)
    # Reconstruction alone makes the encoder confident (large gap); the KL term holds it back.
    assert with_kl < 0.5 * without


def test_loss_combines_reconstruction_and_weighted_kl():
    torch.manual_seed(0)
    model = tiny_dvae(kl_weight=0.25).eval()
    x = make_shapes(2)
    out = model(x)
    expected = out.terms["reconstruction"] + 0.25 * out.terms["kl"]
    torch.testing.assert_close(out.loss, expected)
    out = model(x, kl_weight=2.0)
    torch.testing.assert_close(out.loss, out.terms["reconstruction"] + 2.0 * out.terms["kl"])


def test_temperature_schedule():
    assert gumbel_temperature(0) == pytest.approx(1.0)
    assert gumbel_temperature(150_000) == pytest.approx(1 / 16)
    assert gumbel_temperature(10**7) == pytest.approx(1 / 16)
    # Geometric: half-way through the anneal is the geometric mean of the end points.
    assert gumbel_temperature(75_000) == pytest.approx(0.25)
    assert gumbel_temperature(50, start=2.0, end=0.5, anneal_steps=100) == pytest.approx(1.0)
    values = [gumbel_temperature(s, anneal_steps=100) for s in range(0, 120, 10)]
    assert all(a > b for a, b in zip(values[:10], values[1:11]))
    with pytest.raises(ValueError, match="step.*-1"):
        gumbel_temperature(-1)


def test_kl_weight_schedule():
    assert kl_weight_schedule(0, final=6.6) == 0.0
    assert kl_weight_schedule(2500, final=6.6, warmup_steps=5000) == pytest.approx(3.3)
    assert kl_weight_schedule(5000, final=6.6, warmup_steps=5000) == pytest.approx(6.6)
    assert kl_weight_schedule(10**6, final=6.6) == pytest.approx(6.6)
    assert kl_weight_schedule(3, final=1.0, warmup_steps=0) == 1.0
    values = [kl_weight_schedule(s, final=1.0, warmup_steps=10) for s in range(11)]
    assert all(a < b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="final.*-1"):
        kl_weight_schedule(0, final=-1.0)


def test_bad_inputs_and_config():
    model = tiny_dvae(downsample=8)
    with pytest.raises(ValueError, match="36x32.*multiples of 8"):
        model(torch.zeros(1, 3, 36, 32))
    with pytest.raises(ValueError, match="1 channels.*in_channels=3"):
        model.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="temperature.*0"):
        model(torch.zeros(1, 3, 32, 32), temperature=0.0)
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        model.decode_codes((torch.full((1, 4, 4), 32),))
    with pytest.raises(ValueError, match="downsample must be 4 or 8, got 2"):
        DiscreteVAEConfig(downsample=2)
    with pytest.raises(ValueError, match="codebook_size.*got 1"):
        DiscreteVAEConfig(codebook_size=1)
    with pytest.raises(ValueError, match="kl_weight.*-0.1"):
        DiscreteVAEConfig(kl_weight=-0.1)
