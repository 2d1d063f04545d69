"""Two CPU processes (gloo) train one quantizer on different data and must agree exactly."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vq_core.quantizer import VectorQuantizer

WORLD_SIZE = 2
STEPS = 6
NUM_CODES, DIM = 24, 4
# Unequal per-rank batch sizes: the shared random draws must still index the concatenation.
ROWS_PER_RANK = (40, 56)


def _batches() -> list[list[torch.Tensor]]:
    """For each step, one B x D x 1 x 1 batch per rank, from a few well-separated clusters."""
    gen = torch.Generator().manual_seed(0)
    centres = 4.0 * torch.randn(8, DIM, generator=gen)
    steps = []
    for _ in range(STEPS):
        per_rank = []
        for rows in ROWS_PER_RANK:
            which = torch.randint(0, 8, (rows,), generator=gen)
            vectors = centres[which] + 0.2 * torch.randn(rows, DIM, generator=gen)
            per_rank.append(vectors[:, :, None, None])
        steps.append(per_rank)
    return steps


def _make_quantizer(seed: int | None) -> VectorQuantizer:
    return VectorQuantizer(
        NUM_CODES, DIM, update="ema", data_init=True, dead_code_threshold=1.5, seed=seed
    )


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        torch.set_num_threads(1)
        # Different global seeds: rank 1 starts from another codebook and seed, and the module
        # itself must adopt rank 0's.
        torch.manual_seed(100 + rank)
        quantizer = _make_quantizer(seed=None)
        for per_rank in _batches():
            quantizer(per_rank[rank])
        torch.save(
            {key: value.clone() for key, value in quantizer.state_dict().items()},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_ranks_keep_identical_codebooks_equal_to_one_process_on_all_data(tmp_path):
    init_file = str(tmp_path / "rendezvous")
    mp.spawn(_worker, args=(init_file, str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    states = [
        torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)
    ]

    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), f"ranks differ in {key}"
    assert states[0]["restart_count"].item() > 0, "the run should exercise dead-code restarts"

    # One process built as rank 0 was: the ranks adopted rank 0's codebook and seed.
    torch.manual_seed(100)
    single = _make_quantizer(seed=None)
    for per_rank in _batches():
        single(torch.cat(per_rank, dim=0))
    for key, value in single.state_dict().items():
        torch.testing.assert_close(states[0][key], value, rtol=1e-5, atol=1e-5, msg=key)


if not dist.is_available():  # pragma: no cover - builds without distributed support
    pytestmark = pytest.mark.skip(reason="torch.distributed is not available")
