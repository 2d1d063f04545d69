"""The shared training loop (pipelines.training.fit) under a real Ray Train run.

Early stopping: rank 0 alone evaluates, so the decision to stop must reach every DDP rank at the
same step, or the ranks' collectives (gradient all-reduce, report barriers) would hang.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from pipelines.config import PriorSection, parse_config
from pipelines.data.epochs import EpochReader
from pipelines.data.shards import write_shard
from pipelines.errors import ConfigError
from pipelines.training import BEST_FILE, MODEL_FILE, fit, load_final_model, run_trainer
from vq_core.checkpoint import load_checkpoint
from vq_core.pixelcnn import GatedPixelCNN, GatedPixelCNNConfig, bits_per_code

# The scripted validation score at each evaluation (every 2 steps): best at the third (step 6),
# then two evaluations in a row that miss it; with early_stopping=2 training stops at step 10.
SCORES = [5.0, 4.0, 3.0, 3.5, 3.6, 2.0, 1.0]
EVAL_EVERY, PATIENCE, STEPS = 2, 2, 30


def _loss(model: nn.Module, batch: dict[str, torch.Tensor], step: int):
    loss = bits_per_code(model(batch["top"]), batch["top"])
    return loss, {"loss": loss}


def _scripted_evaluation():
    calls = iter(SCORES)

    def evaluate(model: nn.Module, device: torch.device) -> dict[str, float]:
        return {"score": next(calls)}

    return evaluate


def _train_loop(config: dict) -> None:
    torch.manual_seed(0)
    fit(
        GatedPixelCNN(
            GatedPixelCNNConfig(num_codes=8, height=2, width=2, channels=8, num_layers=1)
        ),
        _loss,
        config["knobs"],
        data=config["data"],
        evaluate_fn=_scripted_evaluation(),
        select_metric="score",
        dtypes={"top": torch.int64, "label": torch.int64},
    )


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    uris = [
        write_shard(
            str(root),
            [f"s{shard}-{i:03d}" for i in range(32)],
            [0] * 32,
            {"top": rng.integers(0, 8, (32, 2, 2)).astype(np.uint8)},
        ).uri
        for shard in range(2)
    ]
    return EpochReader.for_code_shards(
        uris,
        ["top"],
        "all",
        validation_fraction=0,
        test_fraction=0,
        seed=0,
        shuffle_buffer=16,
        columns=("top", "label"),
    )


def test_early_stopping_stops_every_rank_at_the_same_step(ray_local, reader, tmp_path):
    knobs = PriorSection(
        steps=STEPS,
        batch_size=4,
        num_workers=2,
        cpus_per_worker=0.5,
        eval_every=EVAL_EVERY,
        log_every=EVAL_EVERY,
        checkpoint_every=100,
        early_stopping=PATIENCE,
        max_failures=0,
    )
    result = run_trainer(
        _train_loop,
        {"knobs": knobs, "data": reader},
        name="early-stop",
        stage_dir=str(tmp_path),
        knobs=knobs,
        section="train_prior.top",
        resource_wait_seconds=120,
    )
    # The run ended (no rank left waiting in a collective) with a checkpoint at the stop step.
    assert result.metrics["step"] == 10
    _, best = load_final_model(result, prefer_best=True)
    assert best.step == 6 and best.metrics["score"] == 3.0 and best.selected
    assert best.trained_steps == 10
    _, last = load_final_model(result)
    assert last.step == 10 and last.stale_evaluations == PATIENCE
    # The stored dicts keep the keys, in the order, that the loop wrote before they had a type.
    stored = ["epoch", "epoch_batch", "trained_steps", "stale_evaluations", "step", "metrics"]
    with result.checkpoint.as_directory() as directory:
        assert list(load_checkpoint(os.path.join(directory, MODEL_FILE))[1]) == stored
        assert list(load_checkpoint(os.path.join(directory, BEST_FILE))[1]) == [*stored, "selected"]


def test_the_autoencoder_refuses_early_stopping():
    with pytest.raises(ConfigError, match="train_vqvae.early_stopping.*3"):
        parse_config(
            {"output_dir": "o", "data": {"source": "s"}, "train_vqvae": {"early_stopping": 3}}
        )
