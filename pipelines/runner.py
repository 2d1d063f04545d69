"""Runs stages in order, skipping the ones that are up to date, and tracks them in MLflow.

A stage is up to date when its manifest is complete and carries the fingerprint the stage would get
now: a hash of the config sections it reads, of its input corpus' listing (for stages that read the
images), and of the upstream manifests it consumes (their fingerprints and the MLflow runs that wrote
them, so redoing an upstream stage redoes everything downstream). A stage directory left by an
interrupted run with the same fingerprint is kept, so the stage resumes from its partial work; one
with another fingerprint is stale and is cleared first.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Iterable
from typing import Any

from pipelines import storage
from pipelines.config import STAGES, PipelineConfig
from pipelines.manifest import fingerprint, read_manifest, write_manifest
from pipelines.stage import StageContext, ensure_ray
from pipelines.tracking import Tracker, TrackingContext, default_tracking_uri

log = logging.getLogger("vqpipe")

# Which upstream stages each stage consumes, and which config sections it reads.
UPSTREAM: dict[str, tuple[str, ...]] = {
    "train_vqvae": (),
    "tokenize": ("train_vqvae",),
    "train_prior": ("tokenize",),
    "sample": ("train_vqvae", "train_prior"),
    "evaluate": ("train_vqvae", "tokenize", "train_prior", "sample"),
}
SECTIONS: dict[str, tuple[str, ...]] = {
    "train_vqvae": ("seed", "data", "train_vqvae"),
    "tokenize": ("data", "tokenize"),
    "train_prior": ("seed", "train_prior"),
    "sample": ("sample",),
    "evaluate": ("seed", "data", "evaluate"),
}
READS_CORPUS = {"train_vqvae", "tokenize", "evaluate"}
FINGERPRINT_FILE = "fingerprint"


def _stage_module(stage: str):
    return importlib.import_module(f"pipelines.{stage}")


def stage_fingerprint(cfg: PipelineConfig, stage: str, corpus_listing: Any = None) -> str:
    dumped = cfg.model_dump(mode="json")
    sections = {name: dumped[name] for name in SECTIONS[stage]}
    upstream = []
    for up in UPSTREAM[stage]:
        manifest = read_manifest(cfg.stage_dir(up))
        if manifest is None or not manifest.get("complete"):
            upstream.append((up, None))
        else:
            upstream.append((up, manifest.get("fingerprint"), manifest.get("mlflow_run_id")))
    return fingerprint(stage, sections, upstream, corpus_listing if stage in READS_CORPUS else None)


def _prepare_stage_dir(stage_dir: str, fp: str, forced: bool) -> None:
    """Keep partial work of an interrupted run with this fingerprint; clear anything else."""
    marker = storage.join(stage_dir, FINGERPRINT_FILE)
    previous = storage.read_bytes(marker).decode() if storage.exists(marker) else None
    if storage.exists(stage_dir) and (forced or previous != fp):
        reason = "forced" if forced else "its config or inputs changed"
        log.info("clearing %s (%s)", stage_dir, reason)
        storage.remove(stage_dir)
    elif previous == fp:
        log.info("resuming partial work in %s", stage_dir)
    storage.makedirs(stage_dir)
    storage.write_bytes(marker, fp.encode())


def ensure_corpus(cfg: PipelineConfig) -> None:
    """Generate the demo corpus at data.source when the config asks for one and it is not there yet."""
    gen = cfg.data.generate
    if gen is None:
        if not storage.exists(cfg.data.source):
            raise FileNotFoundError(f"data.source {cfg.data.source!r} does not exist")
        return
    from pipelines.demo_data import generate_corpus

    summary = generate_corpus(
        cfg.data.source,
        classes=tuple(gen.classes),
        images_per_class=gen.images_per_class,
        image_size=gen.image_size,
        corrupt_files=gen.corrupt_files,
        seed=gen.seed,
        background=gen.background,
    )
    log.info("demo corpus at %s: %s", cfg.data.source, summary)


def run_stages(
    cfg: PipelineConfig,
    stages: Iterable[str] = STAGES,
    force: Iterable[str] = (),
    run_name: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Run ``stages`` in pipeline order; returns each stage's manifest (run or skipped)."""
    stages = [s for s in STAGES if s in set(stages)]
    force = set(force)
    unknown = force - set(STAGES) - {"all"}
    if unknown:
        raise ValueError(
            f"--force got unknown stage(s) {sorted(unknown)}; expected one of {STAGES} or 'all'"
        )
    if "all" in force:
        force = set(STAGES)
    if "evaluate" in stages and not cfg.evaluate.enabled:
        stages.remove("evaluate")

    ensure_corpus(cfg)
    storage.makedirs(cfg.output_dir)
    tracking_uri = cfg.mlflow.tracking_uri or default_tracking_uri(cfg.output_dir)
    tracker = Tracker(tracking_uri, cfg.mlflow.experiment)
    listing = None
    if READS_CORPUS & set(stages):
        listing = fingerprint(storage.listing_fingerprint(cfg.data.source))

    name = run_name or cfg.mlflow.run_name or time.strftime("pipeline-%Y%m%d-%H%M%S")
    manifests: dict[str, dict[str, Any]] = {}
    with tracker.pipeline_run(name, cfg.model_dump(mode="json")) as parent:
        for stage in stages:
            manifests[stage] = _run_one(cfg, stage, stage in force, listing, tracker, parent)
        parent.log_dict({s: m.get("fingerprint") for s, m in manifests.items()}, "stages.json")
    return manifests


def _run_one(
    cfg: PipelineConfig,
    stage: str,
    forced: bool,
    listing: str | None,
    tracker: Tracker,
    parent: TrackingContext,
) -> dict[str, Any]:
    stage_dir = cfg.stage_dir(stage)
    fp = stage_fingerprint(cfg, stage, listing)
    existing = read_manifest(stage_dir)
    if not forced and existing and existing.get("complete") and existing.get("fingerprint") == fp:
        log.info("== %s: up to date (fingerprint %s), skipped", stage, fp)
        parent.set_tags({f"vqpipe.{stage}": "skipped"})
        return {**existing, "skipped": True}

    log.info("== %s: running (fingerprint %s)", stage, fp)
    ensure_ray(cfg)
    _prepare_stage_dir(stage_dir, fp, forced)
    started = time.time()
    with tracker.stage_run(stage) as tracking:
        dumped = cfg.model_dump(mode="json")
        tracking.log_params(
            {k: dumped[k] for k in SECTIONS[stage] if k != "seed"} | {"seed": cfg.seed}
        )
        ctx = StageContext(
            cfg=cfg, stage=stage, stage_dir=stage_dir, fingerprint=fp, tracking=tracking
        )
        body = _stage_module(stage).run(ctx)
        manifest = write_manifest(
            stage_dir,
            {
                **body,
                "stage": stage,
                "fingerprint": fp,
                "complete": True,
                "mlflow_run_id": tracking.run_id,
                "seconds": round(time.time() - started, 2),
            },
        )
        tracking.log_dict(manifest, "manifest.json")
    parent.set_tags({f"vqpipe.{stage}": "ran"})
    log.info("== %s: done in %.1f s", stage, time.time() - started)
    return manifest
