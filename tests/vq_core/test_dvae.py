"""Behaviour of the discrete VAE: VQ-model interface, Gumbel relaxation, KL term, schedules."""

from __future__ import annotations

import io
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from tests.vq_core.conftest import make_shapes
from vq_core.checkpoint import load_checkpoint, save_checkpoint
from vq_core.dvae import (
    DiscreteVAE,
    DiscreteVAEConfig,
    dvae_schedule,
    gumbel_temperature,
    kl_to_uniform,
    kl_weight_schedule,
    logit_laplace_nll,
    map_pixels,
    scaled_kl_weight,
    unmap_pixels,
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


def test_temperature_schedule_is_the_papers_cosine_from_1_to_1_16():
    assert gumbel_temperature(0) == pytest.approx(1.0)
    assert gumbel_temperature(150_000) == pytest.approx(1 / 16)
    assert gumbel_temperature(10**7) == pytest.approx(1 / 16)
    # Cosine: half-way through the anneal is the arithmetic mean of the end points, and the
    # curve is flat at both ends.
    assert gumbel_temperature(75_000) == pytest.approx((1 + 1 / 16) / 2)
    assert 1.0 - gumbel_temperature(1_500) < 0.01
    assert gumbel_temperature(148_500) - 1 / 16 < 0.01
    assert gumbel_temperature(25, start=2.0, end=0.5, anneal_steps=100) == pytest.approx(
        0.5 + 1.5 * (1 + math.cos(math.pi / 4)) / 2
    )
    values = [gumbel_temperature(s, anneal_steps=100) for s in range(0, 120, 10)]
    assert all(a > b for a, b in zip(values[:10], values[1:11]))
    with pytest.raises(ValueError, match="step.*-1"):
        gumbel_temperature(-1)
    with pytest.raises(ValueError, match="shape.*'linear'"):
        gumbel_temperature(0, shape="linear")


def test_geometric_temperature_schedule():
    # Half-way through, the geometric mean of the end points.
    assert gumbel_temperature(75_000, shape="geometric") == pytest.approx(0.25)
    assert gumbel_temperature(0, shape="geometric") == pytest.approx(1.0)
    assert gumbel_temperature(150_000, shape="geometric") == pytest.approx(1 / 16)


def test_kl_weight_schedule():
    assert kl_weight_schedule(0, final=6.6) == 0.0
    # The paper's default ramp: 5,000 steps, then flat at the final weight.
    assert kl_weight_schedule(4_999, final=6.6) < 6.6
    assert kl_weight_schedule(5_000, final=6.6) == pytest.approx(6.6)
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


# -------------------------------------------------------------------------------------------------
# Logit-Laplace reconstruction


def test_logit_laplace_nll_matches_a_hand_computation():
    # One value: x = 0.3, mu = 0.5, b = e^-0.7. density = exp(-|logit x - mu| / b) / (2 b x (1-x)).
    x, mu, log_b = 0.3, 0.5, -0.7
    b = math.exp(log_b)
    logit = math.log(x / (1 - x))
    density = math.exp(-abs(logit - mu) / b) / (2 * b * x * (1 - x))
    nll = logit_laplace_nll(torch.tensor([x]), torch.tensor([mu]), torch.tensor([log_b]))
    assert nll.item() == pytest.approx(-math.log(density), rel=1e-6)
    # A batch: the mean of the per-value terms, the same as a Laplace density on logit(x) with
    # the log-Jacobian of the logit.
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 4, 4, generator=g) * 0.8 + 0.1
    mu, log_b = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    laplace = torch.distributions.Laplace(mu.double(), log_b.double().exp())
    expected = -(laplace.log_prob(torch.logit(x.double())) - torch.log(x * (1 - x)).double())
    torch.testing.assert_close(logit_laplace_nll(x, mu, log_b).double(), expected.mean())


def test_pixel_mapping_round_trips_and_squeezes_into_eps_margin():
    p = torch.linspace(0, 1, 101)
    mapped = map_pixels(p)
    assert mapped.min().item() == pytest.approx(0.1) and mapped.max().item() == pytest.approx(0.9)
    torch.testing.assert_close(unmap_pixels(mapped), p)
    # Values outside the margin (a sigmoid can reach them) clip to the valid pixel range.
    assert unmap_pixels(torch.tensor([0.0, 0.05, 0.95, 1.0])).tolist() == [0.0, 0.0, 1.0, 1.0]


def test_model_scores_its_images_by_logit_laplace_and_returns_the_location_as_image():
    torch.manual_seed(0)
    model = tiny_dvae().eval()
    x = make_shapes(2)  # in [-1, 1], the project's image convention
    assert model.decoder.up[-1].out_channels == 6  # a location and a log-scale per channel
    out = model(x)
    with torch.no_grad():
        (codes,) = model.encode(x)
        decoded = model.decoder(model.codebook(codes).permute(0, 3, 1, 2))
    mu, log_b = decoded[:, :3], decoded[:, 3:]
    expected = logit_laplace_nll(0.1 + 0.8 * (x + 1) / 2, mu, log_b)
    torch.testing.assert_close(out.terms["reconstruction"], expected)
    image = ((torch.sigmoid(mu) - 0.1) / 0.8).clamp(0, 1) * 2 - 1
    torch.testing.assert_close(out.reconstruction, image)
    torch.testing.assert_close(model.decode_codes((codes,)), image)
    assert out.reconstruction.min() >= -1 and out.reconstruction.max() <= 1


def test_mse_reconstruction_option():
    torch.manual_seed(0)
    model = tiny_dvae(reconstruction="mse").eval()
    assert model.decoder.up[-1].out_channels == 3
    x = make_shapes(2)
    out = model(x)
    torch.testing.assert_close(out.terms["reconstruction"], F.mse_loss(out.reconstruction, x))
    with pytest.raises(ValueError, match="reconstruction must be one of.*'l1'"):
        DiscreteVAEConfig(reconstruction="l1")


def test_logit_laplace_training_lowers_reconstruction_error():
    torch.manual_seed(0)
    model = tiny_dvae()
    x = make_shapes(16, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def mse() -> float:
        model.eval()
        with torch.no_grad():
            error = F.mse_loss(model(x).reconstruction, x).item()
        model.train()
        return error

    before = mse()
    for _ in range(30):
        opt.zero_grad()
        model(x, temperature=0.5).loss.backward()
        opt.step()
    assert mse() < 0.5 * before


# -------------------------------------------------------------------------------------------------
# Straight-through hard samples


def decoder_inputs(model: DiscreteVAE, x: torch.Tensor) -> torch.Tensor:
    """The code weights the decoder read in a training forward (the codebook set to identity)."""
    seen: list[torch.Tensor] = []
    handle = model.decoder.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    try:
        out = model(x, temperature=0.5)
    finally:
        handle.remove()
    out.loss.backward()
    return seen[0]


@pytest.mark.parametrize("hard", [True, False])
def test_hard_samples_are_one_hot_forward_and_pass_gradients(hard):
    torch.manual_seed(0)
    # embed_dim == codebook_size with an identity codebook: the decoder input is the weights.
    model = tiny_dvae(embed_dim=32, hard=hard)
    with torch.no_grad():
        model.codebook.weight.copy_(torch.eye(32))
    weights = decoder_inputs(model, make_shapes(2))
    one_hot = ((weights == 0) | (weights == 1)).all() and torch.equal(
        weights.sum(dim=1), torch.ones_like(weights[:, 0])
    )
    assert bool(one_hot) == hard
    assert model.to_logits.weight.grad.abs().sum() > 0
    assert model.encoder.conv.weight.grad.abs().sum() > 0


def test_hard_samples_follow_the_perturbed_argmax():
    # Very peaked logits: the Gumbel noise cannot overturn a 40-nat margin, so the one-hot sits
    # on the argmax; with flat logits the noise spreads the choices over many codes.
    torch.manual_seed(0)
    model = tiny_dvae(embed_dim=32, hard=True)
    with torch.no_grad():
        model.codebook.weight.copy_(torch.eye(32))
        model.to_logits.weight.zero_()
        model.to_logits.bias.zero_()
        model.to_logits.bias[7] = 40.0
    weights = decoder_inputs(model, make_shapes(2))
    assert (weights.argmax(dim=1) == 7).all()
    with torch.no_grad():
        model.to_logits.bias.zero_()
    model.zero_grad()
    weights = decoder_inputs(model, make_shapes(2))
    assert weights.argmax(dim=1).unique().numel() > 8


# -------------------------------------------------------------------------------------------------
# Checkpoints


@pytest.mark.parametrize(
    "overrides", [{}, {"reconstruction": "mse"}, {"hard": True, "reconstruction": "mse"}]
)
def test_checkpoint_round_trip(overrides):
    torch.manual_seed(0)
    model = tiny_dvae(**overrides).eval()
    buffer = io.BytesIO()
    save_checkpoint(model, buffer)
    buffer.seek(0)
    loaded, _ = load_checkpoint(buffer)
    assert loaded.config == model.config
    x = make_shapes(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).reconstruction, model(x).reconstruction)


def test_checkpoint_written_before_the_reconstruction_option_loads_as_mse():
    # Such checkpoints have no "reconstruction" or "hard" key and a one-output-per-channel
    # decoder trained by MSE.
    torch.manual_seed(0)
    model = tiny_dvae(reconstruction="mse").eval()
    buffer = io.BytesIO()
    save_checkpoint(model, buffer)
    buffer.seek(0)
    payload = torch.load(buffer, weights_only=True)
    del payload["config"]["reconstruction"], payload["config"]["hard"]
    old = io.BytesIO()
    torch.save(payload, old)
    old.seek(0)
    loaded, _ = load_checkpoint(old)
    assert loaded.config.reconstruction == "mse" and loaded.config.hard is False
    x = make_shapes(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).reconstruction, model(x).reconstruction)
    # A model built today without saying otherwise uses the paper's likelihood.
    assert DiscreteVAEConfig().reconstruction == "logit_laplace"


# -------------------------------------------------------------------------------------------------
# Defaults that keep the codebook in use (the demo collapsed to a few codes with kl_weight 1e-3)


def test_kl_weight_default_is_the_papers_beta_scaled_to_means():
    # Summed terms: NLL over C*H*W values + 6.6 * KL over (H/f)*(W/f) positions. Divided by C*H*W,
    # the mean KL per position weighs 6.6 / (C f^2).
    assert scaled_kl_weight(3, 8) == pytest.approx(6.6 / 192)
    assert scaled_kl_weight(3, 4) == pytest.approx(6.6 / 48)
    assert scaled_kl_weight(1, 8, beta=2.0) == pytest.approx(2.0 / 64)
    assert DiscreteVAEConfig(in_channels=3, downsample=8).kl_weight == pytest.approx(6.6 / 192)
    assert DiscreteVAEConfig(in_channels=1, downsample=4).kl_weight == pytest.approx(6.6 / 16)
    assert DiscreteVAEConfig(kl_weight=0.5).kl_weight == 0.5  # an explicit weight is kept

    # The scaling makes the mean-based loss the paper's summed loss divided by C*H*W.
    torch.manual_seed(0)
    model = tiny_dvae(in_channels=3, downsample=4).eval()
    x = make_shapes(2, size=16)
    out = model(x)
    values, positions = x[0].numel(), (16 // 4) ** 2
    summed = out.terms["reconstruction"] * values + 6.6 * out.terms["kl"] * positions
    torch.testing.assert_close(out.loss * values, summed)


def test_schedules_reach_their_end_values_at_the_configured_fractions():
    total = 1000
    at = partial(dvae_schedule, total_steps=total, kl_weight=0.2)
    assert at(0) == (1.0, 0.0)
    temperature, weight = at(100)  # the default KL ramp: the first tenth
    assert weight == pytest.approx(0.2) and temperature > 0.9
    assert at(50)[1] == pytest.approx(0.1)
    assert at(999)[0] == pytest.approx(1 / 16, rel=1e-3)  # the default anneal: the whole run
    assert at(998)[0] > at(999)[0]
    temperature, weight = at(250, anneal_fraction=0.25, warmup_fraction=0.02)
    assert temperature == pytest.approx(1 / 16) and weight == pytest.approx(0.2)
    assert at(20, warmup_fraction=0.02)[1] == pytest.approx(0.2)
    assert at(124, anneal_fraction=0.25)[0] > at(125, anneal_fraction=0.25)[0] > 1 / 16
    assert at(0, warmup_fraction=0.0)[1] == pytest.approx(0.2)
    # A short run anneals fully, where the paper's 150,000 steps would leave it near 1.
    assert dvae_schedule(99, 100, kl_weight=1.0)[0] < 0.07
    assert gumbel_temperature(99) > 0.99
    for bad in (dict(anneal_fraction=1.5), dict(warmup_fraction=-0.1)):
        with pytest.raises(ValueError, match="fraction"):
            at(0, **bad)
    with pytest.raises(ValueError, match="total_steps"):
        dvae_schedule(0, 0, kl_weight=1.0)


def short_training_code_use(**config) -> float:
    """Codes in use (argmax over 256 toy images) after 150 steps with the scaled schedules."""
    torch.manual_seed(0)
    x = make_shapes(256, size=16, seed=1)
    model = tiny_dvae(**config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.Generator().manual_seed(0)
    steps = 150
    for step in range(steps):
        temperature, kl_weight = dvae_schedule(step, steps, kl_weight=model.config.kl_weight)
        batch = x[torch.randint(0, len(x), (32,), generator=order)]
        optimizer.zero_grad()
        model(batch, temperature=temperature, kl_weight=kl_weight).loss.backward()
        optimizer.step()
    (codes,) = model.encode(x)
    return codes.unique().numel() / model.config.codebook_size


def test_default_kl_weight_keeps_more_than_half_the_codebook_in_use():
    # The old default, 1e-3, left 7 of 32 codes in use on this corpus; the paper's beta scaled to
    # the means keeps 27.
    assert short_training_code_use() > 0.5
    assert short_training_code_use(kl_weight=1e-3) < 0.5
