"""Hierarchies of any depth in VQVAE2, and the two-level model kept exactly as it was."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.vq_core.data.make_vqvae2_two_level_v1 import golden_input
from vq_core.checkpoint import load_checkpoint

DATA = Path(__file__).parent / "data"


def test_two_level_checkpoint_from_before_levels_were_configurable_is_bit_identical():
    # Written by the two-level model before `levels` existed (data/make_vqvae2_two_level_v1.py):
    # same keys, same layers in the same order, so the same codes and images to the last bit.
    model, _ = load_checkpoint(DATA / "vqvae2_two_level_v1.pt", expected_model="VQVAE2")
    golden = torch.load(DATA / "vqvae2_two_level_v1_outputs.pt", weights_only=True)
    x = golden_input()

    top, bottom = model.encode(x)
    assert torch.equal(top, golden["top"])
    assert torch.equal(bottom, golden["bottom"])
    assert torch.equal(model.decode_codes((golden["top"], golden["bottom"])), golden["decoded"])
    with torch.no_grad():
        assert torch.equal(model(x).reconstruction, golden["reconstruction"])
