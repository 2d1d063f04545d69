"""The shared training loop (pipelines.training.fit) under a real Ray Train run.

Early stopping: rank 0 alone evaluates, so the decision to stop must reach every DDP rank at the
same step, or the ranks' collectives (gradient all-reduce, report barriers) would hang.
"""

from __future__ import annotations

import ast
import os

import numpy as np
import pytest
import torch
from ray._private.state import actors as ray_actors
from torch import nn

from pipelines.config import PriorSection, parse_config
from pipelines.data.epochs import EpochReader
from pipelines.data.shards import write_shard
from pipelines.errors import ConfigError
from pipelines.training import (
    BEST_FILE,
    MODEL_FILE,
    accumulate_gradients,
    fit,
    load_final_model,
    run_trainer,
)
from tests.pipelines.conftest import tiny_raw_config
from vq_core.checkpoint import load_checkpoint
from vq_core.pixelcnn import GatedPixelCNN, GatedPixelCNNConfig, bits_per_code
from vq_core.recompute import Recomputable

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


def test_accumulated_micro_batches_give_the_gradient_of_one_large_batch():
    torch.manual_seed(0)
    model = GatedPixelCNN(
        GatedPixelCNNConfig(num_codes=8, height=4, width=4, channels=8, num_layers=2)
    )
    codes = torch.randint(0, 8, (8, 4, 4), generator=torch.Generator().manual_seed(1))

    def grads(micro: int) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        batches = [{"top": c} for c in codes.split(micro)]
        logs = list(accumulate_gradients(model, _loss, batches, step=0))
        assert len(logs) == len(batches)
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    whole, accumulated = grads(8), grads(2)
    for name, grad in whole.items():
        assert torch.allclose(grad, accumulated[name], rtol=1e-5, atol=1e-7), name
    # Not the sum of the micro-batches' gradients: each weighs 1/4.
    assert any(g.abs().sum() > 0 for g in whole.values())


def _recomputing_loss(model: nn.Module, batch: dict[str, torch.Tensor], step: int):
    blocks = [m for m in model.modules() if isinstance(m, Recomputable)]
    if not blocks or not all(b.recompute for b in blocks):
        raise AssertionError("activation_checkpointing is on but the blocks do not recompute")
    return _loss(model, batch, step)


def _accumulating_loop(config: dict) -> None:
    torch.manual_seed(0)
    fit(
        GatedPixelCNN(
            GatedPixelCNNConfig(num_codes=8, height=2, width=2, channels=8, num_layers=1)
        ),
        _recomputing_loss,
        config["knobs"],
        data=config["data"],
        dtypes={"top": torch.int64, "label": torch.int64},
    )


def test_steps_count_optimizer_steps_of_accumulated_micro_batches(ray_local, reader, tmp_path):
    knobs = PriorSection(
        steps=3,
        batch_size=4,
        accumulate_steps=2,
        activation_checkpointing=True,
        log_every=1,
        checkpoint_every=3,
        max_failures=0,
        cpus_per_worker=0.5,
    )
    before = set(ray_actors())
    result = run_trainer(
        _accumulating_loop,
        {"knobs": knobs, "data": reader},
        name="accumulate",
        stage_dir=str(tmp_path),
        knobs=knobs,
        section="train_prior.top",
        resource_wait_seconds=120,
        local_ray=True,
    )
    _, meta = load_final_model(result)
    # Three optimizer steps of two micro-batches each: six batches of the first epoch read.
    assert meta.step == 3
    assert (meta.epoch, meta.epoch_batch) == (0, 6)
    # On a Ray of this process, the run started only its controller, its worker and the
    # synchronisation actor its checkpoints need: no preemption watcher (it would watch a node
    # that nothing drains), no placement-group cleaner (the placement group goes with this
    # process' Ray), no dataset manager (the run was given no datasets); each a process of its own.
    # (Ray's autoscaling coordinator is one per Ray, started by its first training run.)
    started = [a["ActorClassName"] for a in ray_actors().values() if a["ActorID"] not in before]
    started = sorted(name for name in started if name != "_AutoscalingCoordinatorActor")
    assert started == ["RayTrainWorker", "SynchronizationActor", "TrainController"]


# What a process of the controller's kind must not import to unpickle its share of a run.
HEAVY = ("torch", "mlflow", "pipelines.config", "pipelines.training", "vq_core")


def _unpickled_in_a_fresh_process(obj: object, tmp_path, then: str, show: str) -> tuple[str, str]:
    """Pickle ``obj``, load it as ``loaded`` in a fresh Python, run ``then``; return the HEAVY
    modules that process imported (as printed) and what ``show`` printed."""
    import subprocess
    import sys

    from ray import cloudpickle

    path = tmp_path / "pickled.pkl"
    path.write_bytes(cloudpickle.dumps(obj))
    probe = (
        "import pickle, sys\n"
        f"loaded = pickle.loads(open({str(path)!r}, 'rb').read())\n"
        f"{then}\n"
        f"heavy = {HEAVY!r}\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] in heavy or n in heavy))\n"
        f"print({show})"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=os.getcwd()
    )
    imported, shown = out.stdout.strip().splitlines()
    return imported, shown


def test_the_controller_and_progress_board_import_neither_torch_nor_mlflow(tmp_path):
    """Ray starts a process for each training run's controller and, on the console, one for its
    progress board; each imports what it unpickles. Kept free of torch, MLflow and the config
    models, they start in a fraction of the time."""
    from pipelines.training import controller_callbacks

    knobs = parse_config(tiny_raw_config(str(tmp_path), str(tmp_path))).train_prior.sections()[
        "top"
    ]
    imported, resources = _unpickled_in_a_fresh_process(
        controller_callbacks(30.0, "train_prior.top", knobs),
        tmp_path,
        then="import pipelines.train_control",
        show="loaded[0].num_workers, loaded[0].per_worker",
    )
    assert imported == "[]"
    assert resources == "1 {'CPU': 1.0}"


def test_the_ray_data_tasks_import_neither_torch_nor_mlflow(tmp_path):
    """Ray Data runs the corpus' decoding, the image cache's parts and tokenize's shard writing as
    tasks, in worker processes of their own (on a cluster, a fresh set for every job and node):
    each imports what it unpickles. Kept free of torch and MLflow, such a worker starts in a
    fraction of the time; only the encoder and sampler actors need torch."""
    from pipelines.data.corpus import _decode_batch
    from pipelines.data.image_cache import _build_part
    from pipelines.data.shards import _decode_code_batch
    from pipelines.stages.tokenize import _write_batch

    tasks = [_decode_batch, _build_part, _decode_code_batch, _write_batch]
    imported, names = _unpickled_in_a_fresh_process(
        tasks, tmp_path, then="", show="[f.__name__ for f in loaded]"
    )
    # The config models read vq_core's table of kinds (torch-free), and nothing else of vq_core.
    assert ast.literal_eval(imported) == ["pipelines.config", "vq_core", "vq_core.kinds"]
    assert names == str([f.__name__ for f in tasks])


def test_a_rank_that_does_not_log_never_imports_mlflow(tmp_path):
    """Every DDP rank unpickles its stage's tracking context, and rank 0 alone logs with it; the
    other ranks' processes (and a run without tracking) never import MLflow."""
    from pipelines.tracking import TrackingContext

    imported, enabled = _unpickled_in_a_fresh_process(
        TrackingContext(f"sqlite:///{tmp_path}/mlflow.db", run_id=None),
        tmp_path,
        then=(
            "import pipelines.stages.train_prior, pipelines.stages.train_vqvae\n"
            "loaded.log_metrics({'train/loss': 1.0}, step=1)\n"
            "loaded.flush()"
        ),
        show="loaded.enabled",
    )
    assert "mlflow" not in ast.literal_eval(imported) and "torch" in ast.literal_eval(imported)
    assert enabled == "False"


def test_the_controller_unpickles_the_loop_and_its_config_without_importing_them(tmp_path):
    """Ray Train's controller unpickles a run's loop and config to pass them to the workers. A
    stage's loop and config (its section's settings, a data reader, the tracking context) come
    from modules that import torch, MLflow and the config models: packed, they reach the
    controller as bytes, and the workers unpack them."""
    from ray import cloudpickle

    from pipelines.stages import train_prior
    from pipelines.tracking import TrackingContext
    from pipelines.train_control import pack_loop, run_packed_loop

    cfg = parse_config(tiny_raw_config(str(tmp_path), str(tmp_path)))
    config = {
        "knobs": cfg.train_prior.sections()["top"],
        "tracking": TrackingContext("sqlite:///x.db"),
    }
    imported, unpacked = _unpickled_in_a_fresh_process(
        (run_packed_loop, pack_loop(train_prior.train_loop_per_worker, config)),
        tmp_path,
        then="loop, config = loaded",
        show="loop.__name__, sorted(config)",
    )
    assert imported == "[]"
    assert unpacked == "run_packed_loop ['vqpipe.loop']"

    # A worker's unpacking gives the loop its config (cloudpickle copies the closure: it writes).
    got = tmp_path / "got.pkl"
    run_packed_loop(pack_loop(lambda c: got.write_bytes(cloudpickle.dumps(c)), config))
    assert cloudpickle.loads(got.read_bytes()) == config
