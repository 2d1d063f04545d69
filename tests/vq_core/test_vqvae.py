"""Behaviour of the VQ-VAE and VQ-VAE-2 autoencoders that the pipeline relies on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.vq_core.conftest import make_shapes
from vq_core.vqvae import VQVAE, VQVAE2, VQVAE2Config, VQVAEConfig


def tiny_vqvae2(in_channels: int = 3, **overrides) -> VQVAE2:
    config = dict(
        in_channels=in_channels,
        channels=16,
        res_blocks=1,
        res_channels=8,
        embed_dim=8,
        codebook_size_top=16,
        codebook_size_bottom=24,
    )
    config.update(overrides)
    return VQVAE2(VQVAE2Config(**config))


def tiny_vqvae(in_channels: int = 3, **overrides) -> VQVAE:
    config = dict(
        in_channels=in_channels,
        channels=16,
        res_blocks=1,
        res_channels=8,
        embed_dim=8,
        codebook_size=16,
    )
    config.update(overrides)
    return VQVAE(VQVAEConfig(**config))


BUILDERS = {"VQVAE": tiny_vqvae, "VQVAE2": tiny_vqvae2}


def images(batch: int, channels: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return make_shapes(batch, size=height, width=width, channels=channels, seed=seed)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [(32, 32), (32, 48), (48, 16)])
@pytest.mark.parametrize("kind", ["VQVAE", "VQVAE2"])
def test_shapes_and_dtypes(kind, channels, size):
    torch.manual_seed(0)
    model = BUILDERS[kind](in_channels=channels)
    h, w = size
    x = images(3, channels, h, w)

    out = model(x)
    assert out.reconstruction.shape == x.shape
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert set(out.terms) == {"reconstruction"} | {
        f"{term}/{level}" for term in ("commitment", "codebook") for level in model.levels
    }
    assert set(out.stats) == {
        f"{s}/{level}" for s in ("perplexity", "usage") for level in model.levels
    }
    assert all(not v.requires_grad for v in out.stats.values())

    codes = model.encode(x)
    assert len(codes) == len(model.levels)
    expected = model.code_shape(h, w)
    assert [tuple(c.shape[1:]) for c in codes] == list(expected)
    assert [(h // f, w // f) for f in model.downsample] == list(expected)
    for c, k in zip(codes, model.codebook_sizes):
        assert c.dtype == torch.long and c.shape[0] == 3
        assert 0 <= int(c.min()) and int(c.max()) < k
    assert model.decode_codes(codes).shape == x.shape


def test_vqvae2_interface():
    model = tiny_vqvae2()
    assert model.levels == ("top", "bottom")
    assert model.codebook_sizes == (16, 24)
    assert model.downsample == (8, 4)
    assert model.code_shape(256, 256) == ((32, 32), (64, 64))
    assert tiny_vqvae().levels == ("codes",)
    assert tiny_vqvae().downsample == (4,)


@pytest.mark.parametrize("kind", ["VQVAE", "VQVAE2"])
def test_decode_of_encode_equals_eval_reconstruction(kind):
    torch.manual_seed(0)
    model = BUILDERS[kind]()
    x = images(8, 3, 32, 48)
    # A few training steps so the codebooks are data-initialised and not trivially tied.
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        model(x).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        reconstruction = model(x).reconstruction
    decoded = model.decode_codes(model.encode(x))
    torch.testing.assert_close(decoded, reconstruction, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["VQVAE", "VQVAE2"])
def test_encode_builds_no_graph_and_leaves_state_unchanged(kind):
    torch.manual_seed(0)
    model = BUILDERS[kind]()
    x = images(4, 3, 32, 32)
    model(x)  # data init and one EMA update, so the buffers hold real statistics
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    codes = model.encode(x)

    assert model.training
    for c in codes:
        assert not c.requires_grad and c.grad_fn is None
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []
    # Encoding twice gives the same codes: nothing adapted to the first call.
    for a, b in zip(codes, model.encode(x)):
        assert torch.equal(a, b)


def test_encoded_codes_can_feed_a_trainable_embedding():
    # Code maps go straight into a prior's embedding layer, which saves them for backward.
    model = tiny_vqvae2()
    top, bottom = model.encode(images(2, 3, 32, 32))
    embedding = nn.Embedding(model.codebook_sizes[1], 4)
    embedding(bottom).sum().backward()
    assert embedding.weight.grad is not None


def test_decode_codes_builds_no_graph():
    model = tiny_vqvae2()
    decoded = model.decode_codes(model.encode(images(2, 3, 32, 32)))
    assert not decoded.requires_grad and decoded.grad_fn is None


def test_changing_one_top_code_changes_the_decoded_image_around_it_only():
    # The top codes must reach the image (a decoder that ignored them would still produce images
    # of the right shape), and only near where they sit: a top code at (1, 1) of an 8 x 8 top
    # map covers pixels 8..16 of a 64 x 64 image; the decoder's receptive field (a few pixels
    # at 1/4 resolution) keeps the far corner untouched.
    torch.manual_seed(0)
    model = tiny_vqvae2().eval()
    for quantizer in model.quantizers.values():
        quantizer.codebook.copy_(torch.randn_like(quantizer.codebook))
    g = torch.Generator().manual_seed(0)
    top = torch.randint(0, 16, (1, 8, 8), generator=g)
    bottom = torch.randint(0, 24, (1, 16, 16), generator=g)
    changed = top.clone()
    changed[0, 1, 1] = (top[0, 1, 1] + 1) % 16

    difference = (model.decode_codes((changed, bottom)) - model.decode_codes((top, bottom))).abs()
    difference = difference.amax(dim=1)[0]  # H x W
    assert difference[8:16, 8:16].mean() > 1e-2
    assert torch.count_nonzero(difference[40:, 40:]) == 0


@pytest.mark.parametrize("update", ["ema", "loss"])
def test_gradients_reach_both_encoders(update):
    torch.manual_seed(0)
    model = tiny_vqvae2(codebook_update=update)
    model(images(4, 3, 32, 32)).loss.backward()

    def grad_norm(module: nn.Module) -> float:
        return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)

    for name in ("encoder_bottom", "encoder_top", "pre_quantize_top", "pre_quantize_bottom"):
        assert grad_norm(getattr(model, name)) > 0, name
    for level in model.levels:
        codebook = model.quantizers[level].codebook
        # EMA codebooks move by averaging, never by gradient; loss codebooks need the gradient.
        if update == "ema":
            assert codebook.grad is None
        else:
            assert codebook.grad is not None and codebook.grad.abs().sum() > 0


def test_training_reduces_error_and_uses_the_codebooks(shapes_rgb):
    torch.manual_seed(0)
    model = VQVAE2(
        VQVAE2Config(
            channels=32,
            res_blocks=1,
            res_channels=16,
            embed_dim=16,
            codebook_size_top=32,
            codebook_size_bottom=32,
            # Each batch holds 8 vectors per code on average at the top level; restarting codes
            # that get fewer than one lets a run of a few hundred steps end with a healthy
            # codebook (the default waits longer, which suits long runs).
            dead_code_threshold=1.0,
        )
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.eval()
    with torch.no_grad():
        start = model(shapes_rgb).terms["reconstruction"].item()
    model.train()
    for _ in range(250):
        batch = shapes_rgb[torch.randint(0, len(shapes_rgb), (16,), generator=g)]
        opt.zero_grad()
        model(batch).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(shapes_rgb)
    error = out.terms["reconstruction"].item()
    assert error < 0.3 * start
    # Also well below predicting the mean image, which scores the pixel variance.
    assert error < 0.5 * shapes_rgb.var(dim=0).mean().item()
    for level in model.levels:
        assert out.stats[f"usage/{level}"].item() > 0.5, level


@pytest.mark.parametrize("kind", ["VQVAE", "VQVAE2"])
def test_wrong_channel_count_is_rejected(kind):
    model = BUILDERS[kind](in_channels=3)
    x = images(2, 1, 32, 32)
    with pytest.raises(ValueError, match="1 channels.*in_channels=3"):
        model(x)
    with pytest.raises(ValueError, match="1 channels"):
        model.encode(x)


@pytest.mark.parametrize("size", [(36, 32), (32, 44), (30, 30)])
def test_vqvae2_rejects_sizes_not_divisible_by_8(size):
    model = tiny_vqvae2()
    h, w = size
    pattern = f"{h}x{w}.*multiples of 8"
    with pytest.raises(ValueError, match=pattern):
        model(torch.zeros(1, 3, h, w))
    with pytest.raises(ValueError, match=pattern):
        model.encode(torch.zeros(1, 3, h, w))
    with pytest.raises(ValueError, match=pattern):
        model.code_shape(h, w)


def test_vqvae_accepts_multiples_of_4_only():
    model = tiny_vqvae()
    assert model(torch.zeros(1, 3, 36, 20)).reconstruction.shape == (1, 3, 36, 20)
    with pytest.raises(ValueError, match="34x20.*multiples of 4"):
        model(torch.zeros(1, 3, 34, 20))


def test_other_bad_inputs_are_rejected():
    model = tiny_vqvae2()
    with pytest.raises(ValueError, match="B x C x H x W"):
        model(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="float"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_decode_codes_rejects_bad_codes():
    model = tiny_vqvae2()
    top = torch.zeros(2, 4, 4, dtype=torch.long)
    bottom = torch.zeros(2, 8, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="tuple of 2"):
        model.decode_codes((top,))
    with pytest.raises(ValueError, match="torch.long"):
        model.decode_codes((top.int(), bottom))
    with pytest.raises(ValueError, match=r"\[0, 24\).*\[24, 24\]"):
        model.decode_codes((top, bottom + 24))
    with pytest.raises(ValueError, match="bottom codes must be 2 times the size of top codes"):
        model.decode_codes((top, bottom[:, :6]))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("codebook_size_top", 1, "codebook_size_top.*got 1"),
        ("codebook_size_bottom", 70000, "codebook_size_bottom.*65536.*got 70000"),
        ("channels", 0, "channels.*got 0"),
        ("channels", 33, "channels must be even"),
        ("in_channels", True, "in_channels.*got True"),
        ("codebook_update", "adam", "codebook_update.*'adam'"),
        ("decay", 1.0, "decay.*got 1.0"),
        ("beta", -1.0, "beta.*got -1.0"),
        ("dead_code_threshold", -0.5, "dead_code_threshold.*-0.5"),
    ],
)
def test_config_validation_names_the_bad_value(field, value, message):
    with pytest.raises(ValueError, match=message):
        VQVAE2Config(**{field: value})


def test_vqvae_config_validation():
    with pytest.raises(ValueError, match="codebook_size.*got 65537"):
        VQVAEConfig(codebook_size=65537)
    assert VQVAEConfig(codebook_size=65536).codebook_size == 65536


def test_bf16_autocast_and_channels_last():
    torch.manual_seed(0)
    model = tiny_vqvae2().to(memory_format=torch.channels_last)
    x = images(4, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        codes = model.encode(x)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert [c.dtype for c in codes] == [torch.long, torch.long]
    assert [tuple(c.shape) for c in codes] == [(4, 4, 4), (4, 8, 8)]
