"""The checkpoint format: exact round trips, guarded loading, no pickled code."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch

from tests.vq_core.conftest import make_shapes
from vq_core.checkpoint import FORMAT, load_checkpoint, model_from_config, save_checkpoint
from vq_core.dvae import DiscreteVAE, DiscreteVAEConfig
from vq_core.vqvae import VQVAE, VQVAE2, VQVAE2Config, VQVAEConfig

SMALL = dict(channels=16, res_blocks=1, res_channels=8, embed_dim=8)


def build(name: str) -> torch.nn.Module:
    if name == "VQVAE":
        return VQVAE(VQVAEConfig(codebook_size=16, **SMALL))
    if name == "VQVAE2":
        return VQVAE2(VQVAE2Config(codebook_size_top=16, codebook_size_bottom=24, **SMALL))
    return DiscreteVAE(DiscreteVAEConfig(codebook_size=32, downsample=4, **SMALL))


def trained(name: str) -> torch.nn.Module:
    """A model after a few steps, so EMA buffers and parameters differ from their init."""
    torch.manual_seed(0)
    model = build(name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = make_shapes(8)
    for _ in range(2):
        opt.zero_grad()
        model(x).loss.backward()
        opt.step()
    return model


def to_bytes(payload) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def to_bytes_of(model: torch.nn.Module) -> bytes:
    """A checkpoint of model, as bytes."""
    buffer = io.BytesIO()
    save_checkpoint(model, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["VQVAE", "VQVAE2", "DiscreteVAE"])
def test_round_trip_restores_outputs_and_buffers(name, tmp_path):
    model = trained(name)
    path = tmp_path / "model.pt"
    save_checkpoint(model, path, extra={"step": 2, "metrics": {"mse": 0.5}, "note": None})

    # Built with a different seed: everything that matches must come from the file.
    torch.manual_seed(123)
    loaded, extra = load_checkpoint(path, expected_model=name)

    assert type(loaded) is type(model) and not loaded.training
    assert loaded.config == model.config
    assert extra == {"step": 2, "metrics": {"mse": 0.5}, "note": None}
    reference = model.state_dict()
    restored = loaded.state_dict()
    assert set(restored) == set(reference)
    for key in reference:
        assert torch.equal(restored[key], reference[key]), key
    if name != "DiscreteVAE":
        # EMA statistics are buffers; losing them would restart codebook training from scratch.
        assert any("embed_sum" in k for k in reference)

    x = make_shapes(4, seed=5)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x).reconstruction, model(x).reconstruction)
    for a, b in zip(loaded.encode(x), model.encode(x)):
        assert torch.equal(a, b)


def test_buffer_and_bytes_round_trip():
    model = trained("VQVAE2")
    buffer = io.BytesIO()
    save_checkpoint(model, buffer)
    buffer.seek(0)
    loaded, extra = load_checkpoint(buffer)
    assert extra is None
    loaded_from_bytes, _ = load_checkpoint(buffer.getvalue())
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
        assert torch.equal(loaded_from_bytes.state_dict()[key], value)


def test_stored_layout_is_plain_and_documented():
    model = build("VQVAE2")
    payload = torch.load(io.BytesIO(to_bytes_of(model)), weights_only=True)
    assert set(payload) == {"format", "model", "config", "state_dict", "extra"}
    assert payload["format"] == FORMAT
    assert payload["model"] == "VQVAE2"
    assert payload["config"] == dataclasses.asdict(model.config)


def test_expected_config_mismatch_names_every_differing_key():
    data = to_bytes_of(build("VQVAE2"))
    with pytest.raises(ValueError) as info:
        load_checkpoint(
            data, expected_config={"codebook_size_top": 512, "embed_dim": 64, "channels": 16}
        )
    message = str(info.value)
    assert "codebook_size_top: expected 512, checkpoint has 16" in message
    assert "embed_dim: expected 64, checkpoint has 8" in message
    assert "channels" not in message  # matching keys are not reported
    with pytest.raises(ValueError, match="colour: expected 'red', checkpoint has no such key"):
        load_checkpoint(data, expected_config={"colour": "red"})
    # Matching expectations load normally.
    model, _ = load_checkpoint(data, expected_config={"codebook_size_top": 16, "channels": 16})
    assert model.codebook_sizes == (16, 24)


def test_expected_model_mismatch():
    with pytest.raises(ValueError, match="holds a VQVAE model, expected VQVAE2"):
        load_checkpoint(to_bytes_of(build("VQVAE")), expected_model="VQVAE2")


def test_state_dict_that_does_not_fit_the_config_names_parameter_and_shapes():
    model = build("VQVAE2")
    payload = torch.load(io.BytesIO(to_bytes_of(model)), weights_only=True)
    payload["config"]["codebook_size_top"] = 40
    with pytest.raises(ValueError) as info:
        load_checkpoint(to_bytes(payload))
    message = str(info.value)
    assert "quantizers.top.code_vectors" in message
    assert "(16, 8)" in message and "(40, 8)" in message


def test_missing_parameter_is_named():
    payload = torch.load(io.BytesIO(to_bytes_of(build("VQVAE"))), weights_only=True)
    del payload["state_dict"]["decoder.conv.weight"]
    with pytest.raises(ValueError, match="decoder.conv.weight: missing from checkpoint"):
        load_checkpoint(to_bytes(payload))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not a readable checkpoint"),
        (b"definitely not a zip archive", "not a readable checkpoint"),
    ],
)
def test_corrupted_files_give_a_clear_error(tmp_path, content, message):
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_truncated_checkpoint_gives_a_clear_error():
    data = to_bytes_of(build("VQVAE"))
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(data[: len(data) // 2])


def test_foreign_files_are_refused():
    model = build("VQVAE")
    with pytest.raises(ValueError, match=f"not a {FORMAT} checkpoint"):
        load_checkpoint(to_bytes(model.state_dict()))  # a bare state_dict
    with pytest.raises(ValueError, match="format: 'someone.else/3'"):
        load_checkpoint(to_bytes({"format": "someone.else/3"}))
    payload = torch.load(io.BytesIO(to_bytes_of(model)), weights_only=True)
    payload["model"] = "Transformer"
    with pytest.raises(ValueError, match="unknown model 'Transformer'.*VQVAE2"):
        load_checkpoint(to_bytes(payload))


UNPICKLED = []


def _record_unpickling() -> str:
    UNPICKLED.append(True)
    return "ran"


class Payload:
    """An object whose unpickling runs code: exactly what a checkpoint must never do."""

    def __reduce__(self):
        return (_record_unpickling, ())


def test_pickled_objects_are_refused_without_running_them():
    model = build("VQVAE")
    payload = torch.load(io.BytesIO(to_bytes_of(model)), weights_only=True)
    payload["extra"] = {"surprise": Payload()}
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint(to_bytes(payload))
    assert UNPICKLED == []


def test_save_refuses_extra_that_would_need_pickle(tmp_path):
    with pytest.raises(TypeError, match=r"extra\['surprise'\] is a Payload"):
        save_checkpoint(build("VQVAE"), tmp_path / "x.pt", extra={"surprise": Payload()})
    assert not (tmp_path / "x.pt").exists()


def test_save_refuses_unregistered_models(tmp_path):
    with pytest.raises(ValueError, match="not in the checkpoint registry"):
        save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "x.pt")


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.pt")


def test_model_from_config():
    model = model_from_config("VQVAE2", dataclasses.asdict(VQVAE2Config(**SMALL)))
    assert isinstance(model, VQVAE2) and model.config.channels == 16
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\]"):
        model_from_config("VQVAE", {"colour": "red"})
    with pytest.raises(ValueError, match="unknown model 'Nope'"):
        model_from_config("Nope", {})
