"""Writes vqvae2_two_level_v1.pt and its golden outputs, vqvae2_two_level_v1_outputs.pt.

The files were written by the two-level VQVAE2 as it was before the number of levels became a
setting; test_levels.py loads them to check that today's code still rebuilds that model exactly.
Keep the committed checkpoint: its stored config has no `levels` key, as every checkpoint written
before that field existed. Rerunning this script today gives the same state_dict and outputs (on
the same kind of CPU), but a checkpoint whose config holds `levels: None`.

    PYTHONPATH=. python tests/vq_core/data/make_vqvae2_two_level_v1.py
"""

from __future__ import annotations

from pathlib import Path

import torch

from vq_core.checkpoint import save_checkpoint
from vq_core.vqvae import VQVAE2, VQVAE2Config

HERE = Path(__file__).parent
CHECKPOINT = HERE / "vqvae2_two_level_v1.pt"
OUTPUTS = HERE / "vqvae2_two_level_v1_outputs.pt"

CONFIG = dict(
    channels=8,
    res_blocks=1,
    res_channels=4,
    embed_dim=4,
    codebook_size_top=16,
    codebook_size_bottom=16,
    data_init=False,
)


def golden_input() -> torch.Tensor:
    """The fixed batch the golden outputs were computed from: 2 RGB 24x32 images in [-1, 1]."""
    g = torch.Generator().manual_seed(20240601)
    return torch.rand(2, 3, 24, 32, generator=g) * 2 - 1


def golden_outputs(model: VQVAE2) -> dict[str, torch.Tensor]:
    x = golden_input()
    top, bottom = model.encode(x)
    with torch.no_grad():
        reconstruction = model(x).reconstruction
    return {
        "top": top,
        "bottom": bottom,
        "decoded": model.decode_codes((top, bottom)),
        "reconstruction": reconstruction,
    }


def trained_model() -> VQVAE2:
    """The checkpointed model: built from seed 0, then trained for two steps on other random
    images, so that the EMA codebooks and their statistics have moved from their initial values
    and the codes spread over several entries."""
    torch.manual_seed(0)
    model = VQVAE2(VQVAE2Config(**CONFIG))
    g = torch.Generator().manual_seed(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.rand(8, 3, 32, 32, generator=g) * 2 - 1).loss.backward()
        optimizer.step()
    return model.eval()


def main() -> None:
    torch.set_num_threads(1)  # as in the tests (conftest.py)
    model = trained_model()
    save_checkpoint(model, CHECKPOINT)
    torch.save(golden_outputs(model), OUTPUTS)


if __name__ == "__main__":
    main()
