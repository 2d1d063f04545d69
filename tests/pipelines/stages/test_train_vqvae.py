"""train_vqvae on a tiny generated corpus with a real local Ray and a real MLflow store."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from pipelines.config import TrainVQVAESection, parse_config
from pipelines.data import storage
from pipelines.data.demo_data import generate_corpus
from pipelines.data.images import to_model_input
from pipelines.stage import StageContext
from pipelines.stages import train_vqvae
from pipelines.tracking import Tracker
from pipelines.training import OPTIMIZER_FILE, InjectedFailure
from tests.pipelines import independent as ind
from tests.pipelines.conftest import tiny_raw_config
from vq_core.checkpoint import load_checkpoint
from vq_core.dvae import DiscreteVAE, DiscreteVAEConfig

CLASSES = ("circle", "square", "triangle", "cross")
STEPS, EVERY = 6, 3  # tiny_config: steps 6, checkpoint and eval every 3, log every 2


def metric_steps(client: MlflowClient, run_id: str, name: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, name))


def run_stage(cfg, tmp_path, fingerprint: str):
    """Run the stage in its own MLflow stage run; returns (manifest or exception, client, run id)."""
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "test")
    outcome: object
    with tracker.stage_run("train_vqvae") as tracking:
        ctx = StageContext(
            cfg, "train_vqvae", storage.join(cfg.output_dir, "train_vqvae"), fingerprint, tracking
        )
        try:
            outcome = train_vqvae.run(ctx)
        except Exception as err:  # the interrupted attempt of the re-run test
            outcome = err
    return outcome, tracker.client, tracking.run_id


def injected(outcome: object) -> bool:
    """Whether ``outcome`` is the fault ``fail_at_step`` injects, or an error caused by it (Ray
    Train wraps a worker's error)."""
    err = outcome if isinstance(outcome, BaseException) else None
    while err is not None:
        if isinstance(err, InjectedFailure) or "fault injected after step" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    generate_corpus(str(root), classes=CLASSES, images_per_class=6, image_size=16)
    return str(root)


def loop_that_saves_each_ranks_quantizers(dump_dir: str):
    """train_vqvae's worker loop, after which every rank saves its quantizers' state (codebook and
    EMA statistics) to ``dump_dir/rank-<rank>.pt``: rank 0 alone writes checkpoints, so the other
    ranks' codebooks are otherwise never seen."""

    def loop(config):
        import ray.train

        fit = train_vqvae.fit

        def fit_then_save(model, *args, **kwargs):
            fit(model, *args, **kwargs)  # trains `model` in place (DDP wraps the same module)
            state = {k: v for k, v in model.state_dict().items() if k.startswith("quantizers.")}
            rank = ray.train.get_context().get_world_rank()
            torch.save(state, os.path.join(dump_dir, f"rank-{rank}.pt"))

        train_vqvae.fit = fit_then_save  # in this worker process only
        try:
            # Looked up here, in the worker, where the module holds the stage's own loop.
            train_vqvae.train_loop_per_worker(config)
        finally:
            train_vqvae.fit = fit

    return loop


@pytest.fixture(scope="module")
def trained(ray_local, corpus, tmp_path_factory):
    """A job on two DDP ranks interrupted right after its step-3 checkpoint, then run again, as
    the runner would; after training, each rank of the attempt that finished saves its
    quantizers' state to ``<tmp>/ranks/rank-<rank>.pt``.

    Returns (config, manifest, MLflow client, run id of the interrupted attempt, run id of the
    attempt that finished, the folder of the ranks' quantizers); each attempt logs to its own
    stage run.
    """
    tmp = tmp_path_factory.mktemp("vqvae")
    raw = tiny_raw_config(str(tmp / "out"), corpus)
    # Two ranks, each on its own part of the data; no retries inside the job, so the injected
    # failure ends the first attempt. Batches of 4 give each rank batches of its half of the
    # train split; two of them hold the whole validation split.
    raw["train_vqvae"] |= {
        "num_workers": 2,
        "cpus_per_worker": 0.5,
        "batch_size": 4,
        "holdout_batches": 2,
        "fail_at_step": EVERY,
        "max_failures": 0,
    }
    cfg = parse_config(raw)
    ranks = tmp / "ranks"
    ranks.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            train_vqvae, "train_loop_per_worker", loop_that_saves_each_ranks_quantizers(str(ranks))
        )
        first, _, first_run = run_stage(cfg, tmp, "fp")
        assert injected(first), f"the first attempt should end with the fault, got {first!r}"
        model_file = os.path.join(storage.join(cfg.output_dir, "train_vqvae"), "model.pt")
        assert not os.path.exists(model_file)
        manifest, client, run_id = run_stage(cfg, tmp, "fp")
    if isinstance(manifest, Exception):
        raise manifest
    return cfg, manifest, client, first_run, run_id, ranks


def test_model_checkpoint_loads_and_encodes(trained):
    _, manifest, _, _, _, _ = trained
    model, extra = load_checkpoint(manifest.checkpoint)
    assert type(model).__name__ == "VQVAE2"
    assert extra["step"] == STEPS
    assert extra["class_names"] == sorted(CLASSES)
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    top, bottom = model.encode(to_model_input(images))
    assert top.shape == (3, 2, 2) and bottom.shape == (3, 4, 4)
    assert int(top.max()) < 16 and int(bottom.max()) < 16


def test_manifest_describes_the_model(trained):
    _, manifest, _, _, _, _ = trained
    assert manifest.model == "vqvae2"
    assert manifest.levels == ["top", "bottom"]
    assert manifest.codebook_sizes == {"top": 16, "bottom": 16}
    assert manifest.code_shapes == {"top": [2, 2], "bottom": [4, 4]}
    assert manifest.image_size == [16, 16] and manifest.channels == 3
    assert manifest.class_names == sorted(CLASSES)
    assert manifest.steps == STEPS


def test_validation_figures_are_the_final_model_on_the_validation_images(trained):
    """Recomputed from the corpus on disk and the published checkpoint, with numpy: the
    validation split (every image of it fits the held-out batches), the reconstruction error and
    each level's codebook use."""
    cfg, manifest, _, _, _, _ = trained
    images = ind.corpus_images(cfg.data.source)
    keys = ind.splits(images, cfg.data)["validation"]
    assert 0 < len(keys) <= cfg.train_vqvae.holdout_batches * cfg.train_vqvae.batch_size
    model = ind.load_model(manifest.checkpoint)
    x = ind.to_input(np.stack([images[k].pixels for k in keys]))
    with torch.no_grad():
        codes = model.encode(x)
        out = model.decode_codes(codes).numpy().astype(np.float64)
    mse = float(np.mean((np.clip(out, -1, 1) - x.numpy().astype(np.float64)) ** 2))
    published = manifest.metrics
    assert published["validation/mse"] == pytest.approx(mse, rel=1e-4)
    for level, level_codes in zip(("top", "bottom"), codes):
        _, usage, perplexity = ind.histogram_figures(level_codes.numpy(), 16)
        assert published[f"validation/usage/{level}"] == pytest.approx(usage), level
        assert published[f"validation/perplexity/{level}"] == pytest.approx(perplexity), level


def test_reconstruction_grid_shows_originals_above_reconstructions(trained):
    cfg, manifest, _, _, _, _ = trained
    grid = np.asarray(Image.open(manifest.artifacts["reconstructions"]))
    n = cfg.train_vqvae.grid_images
    # Two rows of n 16 x 16 tiles with 2-pixel gaps.
    assert grid.shape == (2 * 18 + 2, n * 18 + 2, 3)


def test_mlflow_runs_have_step_and_holdout_metrics_and_artifacts(trained):
    _, _, client, first_run, run_id, _ = trained
    # Logged at the global step: the interrupted attempt up to its checkpoint, the rest after.
    assert metric_steps(client, first_run, "train/loss") == [2]
    assert metric_steps(client, first_run, "validation/mse") == [3]
    assert metric_steps(client, run_id, "train/loss") == [4, 6]
    assert metric_steps(client, run_id, "train/perplexity/top") == [4, 6]
    assert metric_steps(client, run_id, "validation/mse") == [6]
    assert metric_steps(client, run_id, "validation/usage/bottom") == [6]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert "reconstructions.png" in artifacts
    assert [a.path for a in client.list_artifacts(run_id, "model")] == ["model/model.pt"]
    png = client.download_artifacts(run_id, "reconstructions.png")
    assert Image.open(png).size[1] == 2 * 18 + 2


def test_rerun_continues_from_the_checkpoint_instead_of_restarting(trained):
    cfg, _, client, _, run_id, _ = trained
    history = client.get_metric_history(run_id, "resumed_at_step")
    assert [(m.step, m.value) for m in history] == [(EVERY, float(EVERY))]
    # Adam's state came back too: its step count covers both attempts.
    ray_dir = os.path.join(storage.join(cfg.output_dir, "train_vqvae"), "ray", "train_vqvae-fp")
    final = os.path.join(ray_dir, f"step-{STEPS:08d}", OPTIMIZER_FILE)
    state = torch.load(final, weights_only=True)["state"]
    assert {int(s["step"]) for s in state.values()} == {STEPS}


def test_two_ranks_end_with_identical_codebooks_after_resuming(trained):
    # The quantizers' EMA statistics and data initialisation are all-reduced, so both ranks must
    # end with the same codebooks, the published ones, though each trained on its own data and
    # both resumed from the step-3 checkpoint.
    _, manifest, _, _, _, ranks = trained
    rank0 = torch.load(ranks / "rank-0.pt", weights_only=True)
    rank1 = torch.load(ranks / "rank-1.pt", weights_only=True)
    published, _ = load_checkpoint(manifest.checkpoint)
    saved = published.state_dict()
    for level in ("top", "bottom"):
        for name in ("code_vectors", "cluster_size", "embed_sum", "num_updates"):
            key = f"quantizers.{level}.{name}"
            assert torch.equal(rank0[key], rank1[key]), key
            assert torch.equal(rank0[key], saved[key]), key
        # Data initialisation, then one update per step: the resumed run kept the statistics.
        assert int(rank0[f"quantizers.{level}.num_updates"]) == STEPS + 1


# -------------------------------------------------------------------------------------------------
# The pieces the workers run, without Ray


def test_dvae_loss_follows_the_temperature_and_kl_schedules():
    section = TrainVQVAESection(
        kind="dvae",
        model={
            "channels": 8,
            "res_blocks": 0,
            "res_channels": 4,
            "embed_dim": 4,
            "codebook_size": 8,
        },
        steps=100,
        temperature_end=0.25,
        kl_warmup_steps=10,
    )
    model = DiscreteVAE(DiscreteVAEConfig(**section.model))
    loss_fn = train_vqvae.autoencoder_loss(section, model.config)
    batch = {"image": torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)}
    _, start = loss_fn(model, batch, 0)
    _, end = loss_fn(model, batch, 100)
    assert float(start["train/temperature"]) == pytest.approx(1.0)
    assert float(end["train/temperature"]) == pytest.approx(0.25)
    assert float(start["train/kl_weight"]) == 0.0
    assert float(end["train/kl_weight"]) == pytest.approx(model.config.kl_weight)


def test_dvae_schedules_follow_the_configured_fractions_of_the_run():
    """The temperature anneals over temperature_anneal_fraction of the steps and the KL weight
    ramps up over kl_warmup_fraction, both along half a cosine (the midpoint is half way)."""
    section = TrainVQVAESection(
        kind="dvae",
        model={"codebook_size": 8, "kl_weight": 0.4},
        steps=200,
        temperature_end=0.25,
        temperature_anneal_fraction=0.5,
        kl_warmup_fraction=0.2,
    )
    config = DiscreteVAEConfig(in_channels=3, **section.model)

    def at(step):
        return train_vqvae.dvae_schedule(section, config, step)

    assert at(0) == pytest.approx((1.0, 0.0))
    assert at(20) == pytest.approx((0.25 + 0.75 * (1 + math.cos(math.pi * 0.2)) / 2, 0.2))
    assert at(50) == pytest.approx((0.625, 0.4))
    assert at(100) == pytest.approx((0.25, 0.4))
    assert at(199) == pytest.approx((0.25, 0.4))


def test_dvae_schedule_knobs_are_refused_for_vq_models():
    with pytest.raises(ValueError, match="kl_warmup_steps only applies to kind 'dvae'"):
        TrainVQVAESection(kind="vqvae2", kl_warmup_steps=10)


def test_holdout_evaluation_counts_codes_over_the_whole_set():
    model = DiscreteVAE(
        DiscreteVAEConfig(channels=8, res_blocks=0, res_channels=4, embed_dim=4, codebook_size=8)
    ).eval()
    images = np.random.default_rng(1).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    with torch.no_grad():
        metrics = train_vqvae.evaluate_autoencoder(model, torch.device("cpu"), images, batch_size=2)
        x = to_model_input(images)
        expected_mse = float(((model(x).reconstruction - x) ** 2).mean())
        codes = model.encode(x)[0]
    assert metrics["validation/mse"] == pytest.approx(expected_mse, rel=1e-5)
    assert metrics["validation/usage/codes"] == pytest.approx(len(codes.unique()) / 8)
