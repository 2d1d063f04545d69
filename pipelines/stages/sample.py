"""Stage 4: generate images, class by class, from the trained priors and the autoencoder's decoder.

Draws ``sample.per_class`` images of each requested class (for an unlabelled corpus, whose priors
are unconditional: ``sample.per_class`` images in all, in ``unconditional/``) with ``sample.seed`` into
``<output_dir>/sample/`` (how, and the folder's layout: ``pipelines.generation``), logs the grids
and the rejection figures to MLflow, and records the settings it drew with, each level's included
(``sample.levels`` over the stage's temperature, top_k and top_p).
"""

from __future__ import annotations

import logging
import time

from pipelines.config import PipelineConfig
from pipelines.data import storage
from pipelines.generation import (
    check_path_safe,
    check_priors_take_guidance,
    done_uri,
    draw_samples,
    draws_per_class,
    prior_order,
    resolve_classes,
    sampling_settings,
)
from pipelines.manifest import require_manifest
from pipelines.stage import StageContext, StageSpec
from pipelines.stage_manifests import (
    ClassSamples,
    LevelSettings,
    SampleManifest,
    SampleSettings,
    TrainPriorManifest,
)
from pipelines.tokenizer import read_identified, tracking_uri_for

log = logging.getLogger("vqpipe")


def _log_results(
    ctx: StageContext, entries: dict[str, ClassSamples], drawn_now: int, seconds: float
) -> None:
    metrics = {"samples/total": sum(e.count for e in entries.values()), "samples/seconds": seconds}
    if drawn_now:
        metrics["samples/draws_per_second"] = drawn_now / max(seconds, 1e-9)
    for name, entry in entries.items():
        if entry.rejection is not None:
            for key in ("acceptance_rate", "drawn_classified_as_class", "mean_confidence_kept"):
                metrics[f"rejection/{name}/{key}"] = getattr(entry.rejection, key)
        ctx.tracking.log_bytes(storage.read_bytes(entry.grid), f"samples/grid-{name}.png")
    ctx.tracking.log_metrics(metrics)


def run(ctx: StageContext) -> SampleManifest:
    cfg = ctx.cfg.sample
    trained = require_manifest(ctx.cfg.output_dir, TrainPriorManifest)
    priors = prior_order(trained)
    class_names = trained.class_names
    classes = resolve_classes(cfg.classes, class_names)
    for name in classes:
        check_path_safe(name)
    draws = draws_per_class(cfg, class_names)
    drawn_with = sampling_settings(cfg, [p["level"] for p in priors])

    finished = [name for name in classes if storage.exists(done_uri(ctx.stage_dir, name))]
    started = time.time()
    entries = draw_samples(ctx, trained, priors, classes, cfg.seed, draws)
    seconds = time.time() - started
    drawn_now = sum(entries[name].drawn for name in classes if name not in finished)
    _log_results(ctx, entries, drawn_now, seconds)
    labels = f"{len(class_names)} classes" if trained.labelled else "unlabelled"
    ctx.tracking.log_params(
        {"resolved": {"classes": classes, "draws_per_class": draws, "corpus_labels": labels}}
    )

    settings = SampleSettings(
        per_class=cfg.per_class,
        draws_per_class=draws,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        guidance=cfg.guidance,
        method=cfg.method,
        seed=cfg.seed,
        rejection=cfg.rejection.model_dump(mode="json"),
        levels={level: LevelSettings(**drawn) for level, drawn in drawn_with["levels"].items()},
    )
    return SampleManifest(
        classes=entries,
        settings=settings,
        samples=sum(e.count for e in entries.values()),
        levels=[p["level"] for p in priors],
        class_names=class_names,
        checkpoint=trained.tokenizer.checkpoint,
        priors={p["level"]: p["checkpoint"] for p in priors},
        sampling_seconds=round(seconds, 2),
        labelled=trained.labelled,
    )


def _check_inputs(cfg: PipelineConfig) -> None:
    """The autoencoder that decodes the samples is the one the priors' codes came from, and the
    requested classes and rejection fit the priors' classes (none for an unlabelled corpus)."""
    trained = require_manifest(cfg.output_dir, TrainPriorManifest)
    resolve_classes(cfg.sample.classes, trained.class_names)
    draws_per_class(cfg.sample, trained.class_names)
    check_priors_take_guidance(cfg.sample, trained)
    read_identified(trained.tokenizer, tracking_uri_for(cfg))


SPEC = StageSpec(
    manifest=SampleManifest,
    run=run,
    description="sample codes class by class from the priors and decode them into images",
    # The priors' manifest names the autoencoder too (trained here or pinned).
    upstream=(TrainPriorManifest,),
    # data: the rejection classifier trains on the corpus.
    sections=("data",),
    check_inputs=_check_inputs,
)
