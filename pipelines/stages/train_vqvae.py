"""Stage 1: train the autoencoder (VQ-VAE-2, VQ-VAE or dVAE) on the image corpus with Ray Train.

Writes ``<stage_dir>/model.pt`` (vq_core checkpoint format, extra: kind, step, final metrics, image
size, channels, class names) and ``<stage_dir>/reconstructions.png`` (validation images, or training
images when the validation split is empty, above their reconstructions), logs both to the stage's
MLflow run, and returns the manifest that tokenize and evaluate read.

Training reads the train split from the decoded-image cache (``pipelines.data.image_cache``: the corpus
decoded once at the training resolution) through a seeded per-rank reader
(``pipelines.data.epochs``), so the same config and seed give the same model whatever else runs. The
``validation/*`` metrics are measured on a fixed key-hash subset of the validation split; the test
split is left to the evaluate stage.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import numpy as np
import ray
import torch
from torch import nn

from pipelines.checkpoint_meta import CheckpointMeta, load_with_meta
from pipelines.config import DataSection, PipelineConfig, TrainVQVAESection
from pipelines.data import storage
from pipelines.data.corpus import open_corpus
from pipelines.data.epochs import EpochReader
from pipelines.data.image_cache import ensure_image_cache
from pipelines.data.images import encode_png, make_grid, to_model_input, to_uint8
from pipelines.sizing import MemoryProbe, preflight
from pipelines.stage import StageContext, StageSpec
from pipelines.stage_manifests import TrainVQVAEManifest
from pipelines.training import (
    fit,
    is_local_ray,
    load_final_model,
    publish_model,
    run_trainer,
    take_columns,
    training_threads,
)
from vq_core.checkpoint import unwrap_model
from vq_core.dvae import dvae_schedule as schedule_at
from vq_core.kinds import autoencoder_fields, get_kind
from vq_core.quantizer import code_statistics

log = logging.getLogger("vqpipe")

MODEL_NAME = "model.pt"
GRID_NAME = "reconstructions.png"


def build_autoencoder(section: TrainVQVAESection, in_channels: int) -> nn.Module:
    """A freshly initialised autoencoder of ``section.kind`` for images with ``in_channels``."""
    return get_kind(section.kind).build(section.model, autoencoder_fields(in_channels))


def dvae_schedule(section: TrainVQVAESection, config: Any, step: int) -> tuple[float, float]:
    """(Gumbel temperature, KL weight) of a dVAE at ``step``: the temperature anneals and the KL
    weight ramps up over fractions of ``section.steps`` (or the absolute step counts, when set)."""
    steps = section.steps
    anneal = section.temperature_anneal_fraction
    if section.temperature_anneal_steps is not None:
        anneal = min(section.temperature_anneal_steps / steps, 1.0)
    warmup = section.kl_warmup_fraction
    if section.kl_warmup_steps is not None:
        warmup = min(section.kl_warmup_steps / steps, 1.0)
    return schedule_at(
        step,
        steps,
        kl_weight=config.kl_weight,
        temperature_start=config.temperature,
        temperature_end=section.temperature_end,
        anneal_fraction=anneal,
        warmup_fraction=warmup,
    )


def autoencoder_loss(section: TrainVQVAESection, config: Any):
    """The training step's forward pass: images in, (loss, named scalars to log) out."""

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor], step: int):
        x = to_model_input(batch["image"])
        logs: dict[str, torch.Tensor] = {}
        if section.kind == "dvae":
            temperature, kl_weight = dvae_schedule(section, config, step)
            out = model(x, temperature=temperature, kl_weight=kl_weight)
            logs |= {
                "train/temperature": x.new_tensor(temperature),
                "train/kl_weight": x.new_tensor(kl_weight),
            }
        else:
            out = model(x)
        logs["train/loss"] = out.loss
        logs |= {f"train/{k}": v for k, v in out.terms.items()}
        logs |= {f"train/{k}": v for k, v in out.stats.items()}
        return out.loss, logs

    return loss_fn


def evaluate_autoencoder(
    model: nn.Module, device: torch.device, images: np.ndarray, batch_size: int
) -> dict[str, float]:
    """Validation reconstruction MSE (images in [-1, 1]) and code usage/perplexity per level
    (logged as ``validation/*``).

    Usage and perplexity come from the code histogram of the whole validation subset, not a batch
    average: a codebook that uses different codes in different batches is healthier than a
    per-batch figure suggests.
    """
    squared_error, pixels = 0.0, 0
    codes: list[list[torch.Tensor]] = [[] for _ in model.levels]
    for start in range(0, len(images), batch_size):
        x = to_model_input(images[start : start + batch_size]).to(device)
        reconstruction = model(x).reconstruction.float()
        squared_error += float(((reconstruction - x) ** 2).sum())
        pixels += x.numel()
        for level_codes, c in zip(codes, model.encode(x)):
            level_codes.append(c.flatten().cpu())
    metrics = {"validation/mse": squared_error / max(pixels, 1)}
    for level, num_codes, level_codes in zip(model.levels, model.codebook_sizes, codes):
        perplexity, usage = code_statistics(torch.cat(level_codes), num_codes)
        metrics[f"validation/perplexity/{level}"] = float(perplexity)
        metrics[f"validation/usage/{level}"] = float(usage)
    return metrics


def train_loop_per_worker(config: dict[str, Any]) -> None:
    section: TrainVQVAESection = config["section"]
    torch.manual_seed(config["seed"])  # same initial weights on every rank
    model = build_autoencoder(section, config["channels"])
    evaluate_fn = None
    if config["holdout"] is not None:
        images = ray.get(config["holdout"])
        evaluate_fn = partial(evaluate_autoencoder, images=images, batch_size=section.batch_size)
    fit(
        model,
        autoencoder_loss(section, model.config),
        section,
        data=config["data"],
        threads=config["threads"],
        evaluate_fn=evaluate_fn,
        tracking=config["tracking"],
        channels_last=True,
        checkpoint_meta=config["meta"],
        seed=config["seed"],
    )


def reconstruction_grid(model: nn.Module, images: np.ndarray) -> np.ndarray:
    """uint8 grid: the images in the first row, their reconstructions in the second."""
    model = unwrap_model(model).eval()
    with torch.no_grad():
        reconstruction = model(to_model_input(images)).reconstruction
    return make_grid(np.concatenate([images, to_uint8(reconstruction)]), nrow=len(images))


def _holdout_images(ctx: StageContext, corpus: Any) -> tuple[np.ndarray, np.ndarray]:
    """(validation images for evaluation, images for the reconstruction grid)."""
    cfg, section = ctx.cfg, ctx.cfg.train_vqvae
    eval_count = section.holdout_batches * section.batch_size
    holdout = take_columns(
        corpus.dataset("validation"), max(eval_count, section.grid_images), ["image"]
    )["image"]
    if len(holdout) == 0:
        log.warning(
            "train_vqvae: the validation split is empty (data.validation_fraction=%s): no "
            "held-out metrics; the reconstruction grid shows training images",
            cfg.data.validation_fraction,
        )
        grid_images = take_columns(corpus.dataset("train"), section.grid_images, ["image"])["image"]
    else:
        grid_images = holdout[: section.grid_images]
    return holdout[:eval_count], grid_images


def _log_tokenizer(
    ctx: StageContext, model: nn.Module, model_bytes: bytes, images: np.ndarray
) -> str | None:
    """Log the autoencoder as an MLflow tokenizer model (and register it when the config names
    it); returns its ``models:/`` URI when registered."""
    settings = ctx.cfg.mlflow
    if not (settings.log_models and ctx.tracking.enabled):
        return None
    from pipelines.mlflow_models import log_checkpoint_model

    example = np.ascontiguousarray(images[:2])
    with torch.no_grad():
        codes = unwrap_model(model).eval().encode(to_model_input(example))
    output = {level: c.numpy().astype(np.int64) for level, c in zip(model.levels, codes)}
    return log_checkpoint_model(
        ctx.tracking,
        "tokenizer",
        model_bytes,
        example,
        output,
        settings.registered_models.autoencoder,
        name="tokenizer",
    )


def run(ctx: StageContext) -> TrainVQVAEManifest:
    cfg, section = ctx.cfg, ctx.cfg.train_vqvae
    corpus = open_corpus(cfg.data)
    class_names = list(corpus.class_names)
    holdout, grid_images = _holdout_images(ctx, corpus)
    model_uri = storage.join(ctx.stage_dir, MODEL_NAME)
    model, meta, model_bytes = _finished_model(ctx, model_uri, holdout, class_names)
    ctx.tracking.log_bytes(model_bytes, f"model/{MODEL_NAME}")
    registered = _log_tokenizer(ctx, model, model_bytes, grid_images)
    grid_uri = _write_grid(ctx, model, grid_images)

    metrics = {k: v for k, v in meta.metrics.items() if k != "step"}
    log.info("train_vqvae: %d steps, %s", meta.trained_step(), metrics)
    return TrainVQVAEManifest.for_model(
        model,
        checkpoint=model_uri,
        kind=section.kind,
        image_size=cfg.data.size_hw,
        channels=cfg.data.channels,
        class_names=class_names,
        steps=meta.trained_step(),
        metrics=metrics,
        artifacts={"reconstructions": grid_uri},
        registered_model=registered,
    )


def _finished_model(
    ctx: StageContext, model_uri: str, holdout: np.ndarray, class_names: list[str]
) -> tuple[nn.Module, CheckpointMeta, bytes]:
    """(model, checkpoint metadata, checkpoint bytes) of the trained autoencoder, published at
    ``model_uri``: trained now, or the one an earlier attempt finished."""
    if storage.exists(model_uri):
        # Written only after training finished: an earlier attempt died after that point.
        log.info("train_vqvae: reusing the finished model at %s", model_uri)
        model_bytes = storage.read_bytes(model_uri)
        model, meta = load_with_meta(model_bytes)
        return model, meta, model_bytes
    model, meta = _train(ctx, holdout)
    meta = meta.model_copy(
        update={
            "image_size": list(ctx.cfg.data.size_hw),
            "channels": ctx.cfg.data.channels,
            "class_names": class_names,
        }
    )
    return model, meta, publish_model(model, model_uri, meta)


def _train(ctx: StageContext, holdout: np.ndarray) -> tuple[nn.Module, CheckpointMeta]:
    """Train with Ray Train on the train split of the image cache (augmented when data.augment
    says so); the final model and its metadata."""
    cfg, section = ctx.cfg, ctx.cfg.train_vqvae
    preflight(memory_probe(section, cfg.data), ctx.tracking)
    cache = ensure_image_cache(cfg.data, cfg.output_dir)
    data = EpochReader.for_images(
        cache,
        "train",
        validation_fraction=cfg.data.validation_fraction,
        test_fraction=cfg.data.test_fraction,
        seed=cfg.seed,
        shuffle_buffer=section.shuffle_buffer,
        augment=cfg.data.augment,
    )
    local_ray = is_local_ray(cfg.ray)
    loop_config = {
        "data": data,
        "threads": training_threads(section, local_ray),
        "section": section,
        "channels": cfg.data.channels,
        "holdout": ray.put(holdout) if len(holdout) else None,
        "tracking": ctx.tracking,
        "seed": cfg.seed,
        "meta": CheckpointMeta(kind=section.kind),
    }
    result = run_trainer(
        train_loop_per_worker,
        loop_config,
        name=f"{ctx.stage}-{ctx.fingerprint}",
        stage_dir=ctx.stage_dir,
        knobs=section,
        section=ctx.stage,
        resource_wait_seconds=cfg.ray.resource_wait_seconds,
        local_ray=local_ray,
    )
    return load_final_model(result)


def _probe_images(shape: tuple[int, int, int], n: int) -> dict[str, torch.Tensor]:
    """n uint8 images of ``shape`` (H, W, C), as the training reader hands them to the loss."""
    generator = torch.Generator().manual_seed(n)
    return {"image": torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=generator)}


def memory_probe(section: TrainVQVAESection, data: DataSection) -> MemoryProbe:
    """The autoencoder its workers train, for the memory estimate (pipelines.sizing)."""
    return MemoryProbe(
        section="train_vqvae",
        knobs=section,
        build=partial(build_autoencoder, section, data.channels),
        make_batch=partial(_probe_images, (*data.size_hw, data.channels)),
        # The loss needs the model's config (a dVAE's schedules), not a built model.
        loss_fn=autoencoder_loss(
            section, get_kind(section.kind).config(section.model, autoencoder_fields(data.channels))
        ),
    )


def memory_probes(cfg: PipelineConfig) -> list[MemoryProbe]:
    return [memory_probe(cfg.train_vqvae, cfg.data)]


def _write_grid(ctx: StageContext, model: nn.Module, images: np.ndarray) -> str:
    """Write the reconstruction grid to the stage folder and MLflow; returns its URI."""
    grid = reconstruction_grid(model, images)
    grid_uri = storage.join(ctx.stage_dir, GRID_NAME)
    storage.write_bytes(grid_uri, encode_png(grid))
    ctx.tracking.log_image(grid, GRID_NAME)
    return grid_uri


SPEC = StageSpec(
    manifest=TrainVQVAEManifest,
    run=run,
    memory_probes=memory_probes,
    description="train the autoencoder (VQ-VAE-2, VQ-VAE or dVAE) on the corpus with Ray Train",
    sections=("seed", "data"),
    reads_corpus=True,
    on_corpus_change="keep",
    # A pinned tokenizer (tokenize.checkpoint) replaces the autoencoder this stage would train.
    enabled=lambda cfg: not cfg.tokenize.checkpoint,
)
