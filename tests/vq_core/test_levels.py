"""Hierarchies of any depth in VQVAE2, and the two-level model kept exactly as it was."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.vq_core.conftest import make_shapes
from tests.vq_core.data.make_vqvae2_two_level_v1 import golden_input, trained_model
from vq_core.checkpoint import load_checkpoint, save_checkpoint
from vq_core.memory import estimate_training_memory
from vq_core.recompute import set_activation_checkpointing
from vq_core.vqvae import VQVAE2, Decoder, Encoder, LevelSpec, VQVAE2Config

DATA = Path(__file__).parent / "data"
GOLDEN_CHECKPOINT = DATA / "vqvae2_two_level_v1.pt"

NET = dict(channels=16, res_blocks=1, res_channels=8, embed_dim=8)
# Codes at 1/16, 1/8 and 1/4 of the image: a 64 x 64 image gives 4x4, 8x8 and 16x16 maps.
THREE_LEVELS = [
    {"name": "top", "downsample": 2, "codebook_size": 16},
    {"name": "middle", "downsample": 2, "codebook_size": 24},
    {"name": "bottom", "downsample": 4, "codebook_size": 32},
]
TWO_LEVELS = [
    {"name": "top", "downsample": 2, "codebook_size": 16},
    {"name": "bottom", "downsample": 4, "codebook_size": 24},
]


def three_level_model(**overrides) -> VQVAE2:
    return VQVAE2(VQVAE2Config(**{**NET, "levels": THREE_LEVELS, **overrides}))


def randomise_codebooks(model: VQVAE2) -> None:
    # Initial codebooks are tiny and nearly equal; random ones make every code look different.
    for quantizer in model.quantizers.values():
        quantizer.codebook.copy_(torch.randn_like(quantizer.codebook))


def grad_norm(module: nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


# -------------------------------------------------------------------------------------------------
# The two-level model is the model it was


def golden_payload() -> dict:
    return torch.load(GOLDEN_CHECKPOINT, weights_only=True)


def test_two_level_checkpoint_from_before_levels_were_configurable_is_bit_identical():
    # Written by the two-level model before `levels` existed (data/make_vqvae2_two_level_v1.py):
    # same keys, same layers in the same order, so the same codes and images to the last bit.
    model, _ = load_checkpoint(GOLDEN_CHECKPOINT, expected_model="VQVAE2")
    golden = torch.load(DATA / "vqvae2_two_level_v1_outputs.pt", weights_only=True)
    x = golden_input()

    top, bottom = model.encode(x)
    assert torch.equal(top, golden["top"])
    assert torch.equal(bottom, golden["bottom"])
    assert torch.equal(model.decode_codes((golden["top"], golden["bottom"])), golden["decoded"])
    with torch.no_grad():
        assert torch.equal(model(x).reconstruction, golden["reconstruction"])


def test_two_level_model_trains_from_a_seed_to_the_old_checkpoint_bit_for_bit():
    # The same seed builds the same initial weights (the modules are created in the old order),
    # and two training steps (forward, losses, backward, EMA updates) end on the same state.
    model = trained_model()
    stored = golden_payload()["state_dict"]
    state = model.state_dict()
    assert list(state) == list(stored)
    for key, value in stored.items():
        assert torch.equal(state[key], value), key


def test_two_level_state_dict_keys_are_those_of_the_old_checkpoint():
    payload = golden_payload()
    assert "levels" not in payload["config"]  # written before the field existed
    config = VQVAE2Config(**payload["config"])
    assert config.levels is None
    assert config.level_specs() == (
        LevelSpec("top", 2, 16),
        LevelSpec("bottom", 4, 16),
    )
    explicit = dataclasses.replace(
        config,
        levels=[
            {"name": "top", "downsample": 2, "codebook_size": 16},
            {"name": "bottom", "downsample": 4, "codebook_size": 16},
        ],
    )
    for model in (VQVAE2(config), VQVAE2(explicit)):
        assert list(model.state_dict()) == list(payload["state_dict"])


def test_explicit_default_levels_build_the_same_model_as_none():
    torch.manual_seed(0)
    implicit = VQVAE2(VQVAE2Config(**NET, codebook_size_top=16, codebook_size_bottom=24))
    torch.manual_seed(0)
    explicit = VQVAE2(VQVAE2Config(**NET, levels=TWO_LEVELS))
    assert explicit.levels == implicit.levels == ("top", "bottom")
    assert explicit.downsample == implicit.downsample == (8, 4)
    assert explicit.codebook_sizes == implicit.codebook_sizes == (16, 24)

    reference, state = implicit.state_dict(), explicit.state_dict()
    assert list(state) == list(reference)
    for key in reference:
        assert torch.equal(state[key], reference[key]), key

    x = make_shapes(4)
    a, b = implicit(x), explicit(x)  # train mode: data init and one EMA step on each
    assert torch.equal(a.reconstruction, b.reconstruction) and torch.equal(a.loss, b.loss)
    assert a.terms.keys() == b.terms.keys() and a.stats.keys() == b.stats.keys()
    for x_codes, y_codes in zip(implicit.encode(x), explicit.encode(x)):
        assert torch.equal(x_codes, y_codes)


# -------------------------------------------------------------------------------------------------
# Three levels


def test_three_levels_interface_shapes_and_dtypes():
    torch.manual_seed(0)
    model = three_level_model()
    assert model.levels == ("top", "middle", "bottom")
    assert model.downsample == (16, 8, 4)
    assert model.codebook_sizes == (16, 24, 32)
    assert model.code_shape(64, 48) == ((4, 3), (8, 6), (16, 12))
    # The class still describes the default two-level model.
    assert VQVAE2.levels == ("top", "bottom") and VQVAE2.downsample == (8, 4)

    x = make_shapes(3, size=64, width=48)
    out = model(x)
    assert out.reconstruction.shape == x.shape
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert list(out.terms) == ["reconstruction"] + [
        f"{term}/{level}" for level in model.levels for term in ("commitment", "codebook")
    ]
    assert list(out.stats) == [
        f"{stat}/{level}" for level in model.levels for stat in ("perplexity", "usage")
    ]

    codes = model.encode(x)
    assert isinstance(codes, tuple)
    assert [tuple(c.shape) for c in codes] == [(3, 4, 3), (3, 8, 6), (3, 16, 12)]
    assert [tuple(c.shape[1:]) for c in codes] == list(model.code_shape(64, 48))
    for c, k in zip(codes, model.codebook_sizes):
        assert c.dtype == torch.int64
        assert 0 <= int(c.min()) and int(c.max()) < k
    model.eval()
    decoded = model.decode_codes(codes)
    assert decoded.shape == x.shape
    with torch.no_grad():
        torch.testing.assert_close(decoded, model(x).reconstruction, atol=1e-5, rtol=1e-5)


def test_three_levels_modules_and_keys():
    model = three_level_model()
    prefixes = {key.split(".")[0] for key in model.state_dict()}
    assert prefixes == {
        "encoder_top",
        "encoder_middle",
        "encoder_bottom",
        "pre_quantize_top",
        "pre_quantize_middle",
        "pre_quantize_bottom",
        "decoder_top",
        "decoder_middle",
        "quantizers",
        "upsample_top",
        "upsample_middle",
        "decoder",
    }
    # The top is 4x coarser than the bottom: two stride-2 layers; the middle, 2x: one bare layer.
    assert isinstance(model.upsample_top, nn.Sequential)
    assert [type(m) for m in model.upsample_top] == [
        nn.ConvTranspose2d,
        nn.ReLU,
        nn.ConvTranspose2d,
    ]
    assert isinstance(model.upsample_middle, nn.ConvTranspose2d)
    # Each level below the top reads its features and the guide from the level above.
    assert model.pre_quantize_top.in_channels == 16
    assert model.pre_quantize_middle.in_channels == model.pre_quantize_bottom.in_channels == 16 + 8
    assert model.decoder.conv.in_channels == 3 * 8


@pytest.mark.parametrize("update", ["ema", "loss"])
def test_three_levels_gradients_reach_every_level(update):
    torch.manual_seed(0)
    model = three_level_model(codebook_update=update)
    model(make_shapes(2, size=32)).loss.backward()
    for level in model.levels:
        for prefix in ("encoder", "pre_quantize"):
            assert grad_norm(getattr(model, f"{prefix}_{level}")) > 0, (prefix, level)
        codebook = model.quantizers[level].codebook
        if update == "ema":
            assert codebook.grad is None
        else:
            assert codebook.grad is not None and codebook.grad.abs().sum() > 0, level
    for level in model.levels[:-1]:
        assert grad_norm(getattr(model, f"decoder_{level}")) > 0, level
        assert grad_norm(getattr(model, f"upsample_{level}")) > 0, level
    assert grad_norm(model.decoder) > 0


def test_every_levels_codes_reach_the_image():
    torch.manual_seed(0)
    model = three_level_model().eval()
    randomise_codebooks(model)
    g = torch.Generator().manual_seed(0)
    codes = [
        torch.randint(0, k, (1, h, w), generator=g)
        for k, (h, w) in zip(model.codebook_sizes, model.code_shape(64, 64))
    ]
    reference = model.decode_codes(codes)
    for i, level in enumerate(model.levels):
        changed = [c.clone() for c in codes]
        changed[i][0, 1, 1] = (codes[i][0, 1, 1] + 1) % model.codebook_sizes[i]
        difference = (model.decode_codes(changed) - reference).abs().max()
        assert difference > 1e-3, level


def test_three_levels_decode_codes_rejects_mismatched_maps():
    model = three_level_model()
    top = torch.zeros(2, 4, 4, dtype=torch.long)
    middle = torch.zeros(2, 8, 8, dtype=torch.long)
    bottom = torch.zeros(2, 16, 16, dtype=torch.long)
    assert model.decode_codes((top, middle, bottom)).shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match=r"tuple of 3 code maps \('top', 'middle', 'bottom'\)"):
        model.decode_codes((top, bottom))
    with pytest.raises(
        ValueError,
        match=r"middle codes must be 2 times the size of top codes.*top \(2, 4, 4\) and "
        r"middle \(2, 8, 6\)",
    ):
        model.decode_codes((top, middle[:, :, :6], bottom))
    with pytest.raises(ValueError, match=r"bottom codes must be 2 times the size of middle.*\(1,"):
        model.decode_codes((top, middle, bottom[:1]))
    with pytest.raises(ValueError, match=r"middle codes must lie in \[0, 24\)"):
        model.decode_codes((top, middle + 24, bottom))


def test_three_levels_need_images_that_are_multiples_of_16():
    model = three_level_model()
    with pytest.raises(ValueError, match="40x32.*multiples of 16"):
        model.code_shape(40, 32)
    with pytest.raises(ValueError, match="40x32.*multiples of 16"):
        model.encode(torch.zeros(1, 3, 40, 32))


def test_three_levels_recompute_and_memory_estimate():
    torch.manual_seed(0)
    model = three_level_model(data_init=False)
    # Three encoders, two guide decoders and the image decoder.
    assert set_activation_checkpointing(model, True) == 6
    estimate = estimate_training_memory(
        model,
        lambda n: make_shapes(n, size=32),
        lambda m, x: m(x).loss,
        batch_size=8,
    )
    assert estimate.per_sample_bytes > 0 and estimate.peak_bytes > estimate.parameter_bytes


# -------------------------------------------------------------------------------------------------
# One level, and factors beyond 8


def test_one_level_hierarchy():
    torch.manual_seed(0)
    model = VQVAE2(
        VQVAE2Config(**NET, levels=[{"name": "codes", "downsample": 8, "codebook_size": 16}])
    )
    assert model.levels == ("codes",) and model.downsample == (8,)
    assert not any(name.startswith(("decoder_", "upsample_")) for name, _ in model.named_children())
    assert model.pre_quantize_codes.in_channels == 16
    x = make_shapes(2, size=32, width=16)
    out = model(x)
    assert out.reconstruction.shape == x.shape
    assert set(out.terms) == {"reconstruction", "commitment/codes", "codebook/codes"}
    out.loss.backward()
    assert grad_norm(model.encoder_codes) > 0
    (codes,) = model.encode(x)
    assert codes.shape == (2, 4, 2) and codes.dtype == torch.int64
    assert model.decode_codes((codes,)).shape == x.shape


def test_encoder_and_decoder_take_any_power_of_two():
    x = torch.zeros(1, 3, 32, 32)
    assert Encoder(3, 8, 1, 4, 16)(x).shape == (1, 8, 2, 2)
    assert Decoder(8, 3, 8, 1, 4, 16)(torch.zeros(1, 8, 2, 2)).shape == (1, 3, 32, 32)
    for factor in (1, 3, 6):
        with pytest.raises(ValueError, match=f"power of two >= 2, got {factor}"):
            Encoder(3, 8, 1, 4, factor)


# -------------------------------------------------------------------------------------------------
# Config


def level(name="top", downsample=2, codebook_size=16) -> dict:
    return {"name": name, "downsample": downsample, "codebook_size": codebook_size}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"levels": []}, r"levels must hold at least one level, got \[\]"),
        ({"levels": "top"}, r"levels must be a list of level specs.*got 'top'"),
        ({"levels": level()}, r"levels must be a list of level specs"),
        ({"levels": [("top", 2, 16)]}, r"levels\[0\] must be a mapping.*got \('top', 2, 16\)"),
        (
            {"levels": [level(downsample=3)]},
            r"levels\[0\]\.downsample must be a power of two >= 2, got 3$",
        ),
        ({"levels": [level(), level("b", 1)]}, r"levels\[1\]\.downsample .* got 1$"),
        ({"levels": [level(downsample=2.0)]}, r"levels\[0\]\.downsample .* got 2\.0$"),
        ({"levels": [level(downsample=True)]}, r"levels\[0\]\.downsample .* got True$"),
        (
            {"levels": [level(name="")]},
            r"levels\[0\]\.name must match \[a-z\]\[a-z0-9_\]\*, got ''",
        ),
        ({"levels": [level(name="Top")]}, r"levels\[0\]\.name must match .*got 'Top'"),
        ({"levels": [level(name="2x")]}, r"levels\[0\]\.name must match .*got '2x'"),
        ({"levels": [level(name="a-b")]}, r"levels\[0\]\.name must match .*got 'a-b'"),
        ({"levels": [level(name=7)]}, r"levels\[0\]\.name must match .*got 7"),
        ({"levels": [level(name="values")]}, r"levels\[0\]\.name 'values' is reserved"),
        (
            {"levels": [level("top"), level("mid"), level("top", 4)]},
            r"levels\[2\]\.name 'top' is already the name of levels\[0\]",
        ),
        ({"levels": [level(codebook_size=1)]}, r"levels\[0\]\.codebook_size must be .*got 1$"),
        (
            {"levels": [level(), level("bottom", 4, 70000)]},
            r"levels\[1\]\.codebook_size must be .*65536.*got 70000$",
        ),
        (
            {"levels": [{"name": "top", "downsample": 2}]},
            r"levels\[0\] must have exactly the keys .*missing \['codebook_size'\], unknown \[\]",
        ),
        (
            {"levels": [{**level(), "embed_dim": 8}]},
            r"levels\[0\] must have exactly the keys .*missing \[\], unknown \['embed_dim'\]",
        ),
        (
            {"levels": [level("top", 2, 16), level("bottom", 4, 32)], "codebook_size_top": 1024},
            r"codebook_size_top=1024 contradicts levels\[0\]\.codebook_size=16",
        ),
        (
            {"levels": [level("top", 2, 16), level("bottom", 4, 32)], "codebook_size_bottom": 16},
            r"codebook_size_bottom=16 contradicts levels\[1\]\.codebook_size=32",
        ),
        (
            {"levels": [level("coarse"), level("fine", 4)], "codebook_size_bottom": 256},
            r"codebook_size_bottom=256 sets the codebook of level 'bottom', which levels does not "
            r"have",
        ),
    ],
)
def test_bad_levels_are_rejected_naming_the_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        VQVAE2Config(**overrides)


def test_codebook_sizes_that_agree_with_levels_are_accepted():
    config = VQVAE2Config(
        codebook_size_top=16, levels=[level("top", 2, 16), level("bottom", 4, 1024)]
    )
    assert [spec.codebook_size for spec in config.level_specs()] == [16, 1024]
    # Left at their defaults, codebook_size_top/bottom say nothing about levels of other names.
    config = VQVAE2Config(levels=[level("coarse", 2, 16), level("fine", 4, 32)])
    assert [spec.name for spec in config.level_specs()] == ["coarse", "fine"]


def test_levels_are_normalised_and_round_trip_through_asdict_and_json():
    from_dicts = VQVAE2Config(**NET, levels=THREE_LEVELS)
    from_specs = VQVAE2Config(**NET, levels=[LevelSpec(**spec) for spec in THREE_LEVELS])
    assert from_dicts.levels == from_specs.levels == from_dicts.level_specs()
    assert all(isinstance(spec, LevelSpec) for spec in from_dicts.levels)
    assert from_dicts == from_specs

    stored = json.loads(json.dumps(dataclasses.asdict(from_dicts)))
    assert stored["levels"] == THREE_LEVELS
    assert VQVAE2Config(**stored) == from_dicts
    assert json.loads(json.dumps(dataclasses.asdict(VQVAE2Config())))["levels"] is None


def test_level_spec_instances_are_validated_too():
    with pytest.raises(ValueError, match=r"levels\[0\]\.downsample must be a power of two"):
        VQVAE2Config(levels=[LevelSpec("top", 5, 16)])


# -------------------------------------------------------------------------------------------------
# Checkpoints


def test_three_level_checkpoint_round_trip_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    model = three_level_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        model(make_shapes(4, size=32)).loss.backward()
        optimizer.step()
    path = tmp_path / "three.pt"
    save_checkpoint(model, path)

    torch.manual_seed(123)
    loaded, _ = load_checkpoint(
        path, expected_model="VQVAE2", expected_config={"levels": THREE_LEVELS}
    )
    assert loaded.config == model.config and loaded.levels == model.levels
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    x = make_shapes(2, size=64, seed=3)
    model.eval()
    codes = model.encode(x)
    for a, b in zip(loaded.encode(x), codes):
        assert torch.equal(a, b)
    assert torch.equal(loaded.decode_codes(codes), model.decode_codes(codes))
    with torch.no_grad():
        assert torch.equal(loaded(x).reconstruction, model(x).reconstruction)


def test_config_without_levels_loads_as_two_levels():
    torch.manual_seed(0)
    model = VQVAE2(VQVAE2Config(**NET, codebook_size_top=16, codebook_size_bottom=24))
    buffer = io.BytesIO()
    save_checkpoint(model, buffer)
    payload = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert payload["config"]["levels"] is None
    del payload["config"]["levels"]  # as a checkpoint written before the field existed
    old = io.BytesIO()
    torch.save(payload, old)

    loaded, _ = load_checkpoint(old.getvalue())
    assert loaded.levels == ("top", "bottom") and loaded.codebook_sizes == (16, 24)
    assert loaded.config == model.config
