"""Runs stages in order, skipping the ones that are up to date, and tracks them in MLflow.

A stage is up to date when its manifest is complete and carries the fingerprint the stage would get
now. Two fingerprints are computed per stage:

- its *identity*: a hash of the config sections it reads, of the upstream manifests it consumes
  (their fingerprints and the MLflow runs that wrote them, so redoing an upstream stage redoes
  everything downstream) and, for stages declared ``on_corpus_change="redo"``, of the corpus
  listing. A stage directory left with the same identity is kept, so the stage resumes from its
  partial work; one with another identity is stale and is cleared first.
- its *manifest fingerprint*: the identity, joined by the corpus listing for stages declared
  ``on_corpus_change="incremental"``. When only the listing changed, such a stage is not up to
  date but its directory is kept: the stage runs again over its finished work (tokenize encodes
  only the images it has not encoded). Its new manifest and MLflow run make every downstream
  stage stale.

Stages declared ``on_corpus_change="keep"`` ignore the listing altogether (train_vqvae).

Inputs from outside ``output_dir`` (``StageSpec.external_inputs``: a pinned tokenizer checkpoint's
sha256, the manifests of other runs' code shards) join the identity too, and are read and checked
before the first stage writes anything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from pipelines import console
from pipelines.config import PipelineConfig, without_neutral_defaults
from pipelines.data import storage
from pipelines.errors import ConfigError, ManifestError, MissingInputError
from pipelines.manifest import StageManifest, fingerprint, read_manifest, write_manifest
from pipelines.stage import ConfigView, StageContext, StageSpec, ensure_ray
from pipelines.stages import STAGES, stage_names
from pipelines.tracking import Tracker, TrackingContext, default_tracking_uri

log = logging.getLogger("vqpipe")

FINGERPRINT_FILE = "fingerprint"


@dataclass(frozen=True)
class StageOutcome:
    """A stage's manifest after a pipeline run, whether it ran or was up to date.

    ``sections_read`` are the config sections the stage read when it ran (empty when skipped).
    """

    manifest: StageManifest
    skipped: bool
    sections_read: frozenset[str] = frozenset()


def _upstream_state(output_dir: str, cls: type[StageManifest]) -> tuple:
    """What a downstream fingerprint records of an upstream stage: its fingerprint and run."""
    try:
        manifest = read_manifest(output_dir, cls)
    except ManifestError:
        manifest = None
    if manifest is None:
        return (cls.stage, None)
    return (cls.stage, manifest.fingerprint, manifest.mlflow_run_id)


def stage_inputs(
    cfg: PipelineConfig, spec: StageSpec, corpus_listing: str | None = None
) -> dict[str, str]:
    """A hash per input of the stage: each config section it reads, each upstream manifest (its
    fingerprint and MLflow run) and the corpus listing. Kept in the manifest, so that a stale
    stage can say which input changed."""
    dumped = cfg.model_dump(mode="json")
    inputs = {
        f"config.{name}": fingerprint(without_neutral_defaults(name, dumped[name]))
        for name in spec.reads
    }
    for cls in spec.upstream_of(cfg):
        inputs[f"upstream.{cls.stage}"] = fingerprint(_upstream_state(cfg.output_dir, cls))
    for name, digest in spec.external_of(cfg).items():
        inputs[f"external.{name}"] = digest
    # A stage that keeps its outputs when the corpus changes does not depend on the listing.
    if spec.listing_in_manifest:
        inputs["corpus"] = fingerprint(corpus_listing)
    return inputs


def stage_fingerprint(
    cfg: PipelineConfig, spec: StageSpec, corpus_listing: str | None = None
) -> str:
    """The stage's identity: config sections, upstream state, and the listing if it redoes on it."""
    inputs = stage_inputs(cfg, spec, corpus_listing)
    if not spec.listing_in_identity:
        inputs.pop("corpus", None)
    return fingerprint(spec.name, inputs)


def manifest_fingerprint(spec: StageSpec, identity: str, corpus_listing: str | None) -> str:
    """What the stage's manifest must carry to be up to date (see the module docstring)."""
    if spec.listing_in_manifest and not spec.listing_in_identity:
        return fingerprint(identity, corpus_listing)
    return identity


def _prepare_stage_dir(stage_dir: str, fp: str, forced: bool) -> None:
    """Keep partial or finished work of a run with this identity; clear anything else."""
    marker = storage.join(stage_dir, FINGERPRINT_FILE)
    previous = storage.read_bytes(marker).decode() if storage.exists(marker) else None
    if storage.exists(stage_dir) and (forced or previous != fp):
        reason = "forced" if forced else "its config or inputs changed"
        log.info("clearing %s (%s)", stage_dir, reason)
        storage.remove(stage_dir)
    elif previous == fp:
        log.info("resuming from the work in %s", stage_dir)
    storage.makedirs(stage_dir)
    storage.write_bytes(marker, fp.encode())


def ensure_corpus(cfg: PipelineConfig) -> None:
    """Generate the demo corpus at data.source when the config asks for one and it is not there yet."""
    gen = cfg.data.generate
    if gen is None:
        if not storage.exists(cfg.data.source):
            raise MissingInputError(f"data.source {cfg.data.source!r} does not exist")
        return
    from pipelines.data.demo_data import generate_corpus

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


def _select(
    cfg: PipelineConfig, stages: Iterable[str] | None, force: Iterable[str]
) -> tuple[list[StageSpec], set[str]]:
    """The stages to run, in pipeline order, and the names of those forced."""
    names = stage_names()
    wanted = set(names if stages is None else stages)
    force = set(force)
    unknown = (wanted | force) - set(names) - {"all"}
    if unknown:
        raise ConfigError(
            f"unknown stage(s) {sorted(unknown)}; expected one of {names} (or 'all' for --force)"
        )
    if "all" in force:
        force = set(names)
    if stages is not None:
        for spec in STAGES:
            if spec.name in wanted and not spec.enabled(cfg):
                log.warning("== %s: disabled by the configuration, not run", spec.name)
    return [s for s in STAGES if s.name in wanted and s.enabled(cfg)], force


def run_stages(
    cfg: PipelineConfig,
    stages: Iterable[str] | None = None,
    force: Iterable[str] = (),
    run_name: str | None = None,
) -> dict[str, StageOutcome]:
    """Run ``stages`` (default: all) in pipeline order; returns each stage's outcome."""
    specs, force = _select(cfg, stages, force)
    # Inputs from outside output_dir (a pinned tokenizer, other runs' code shards) are checked
    # before anything is written, so a bad one leaves no trace.
    for spec in specs:
        spec.external_of(cfg)
    ensure_corpus(cfg)
    storage.makedirs(cfg.output_dir)
    tracking_uri = cfg.mlflow.tracking_uri or default_tracking_uri(cfg.output_dir)
    tracker = Tracker(tracking_uri, cfg.mlflow.experiment)
    listing = None
    if any(spec.listing_in_manifest for spec in specs):
        listing = fingerprint(storage.listing_fingerprint(cfg.data.source))

    name = run_name or cfg.mlflow.run_name or time.strftime("pipeline-%Y%m%d-%H%M%S")
    outcomes: dict[str, StageOutcome] = {}
    with tracker.pipeline_run(name, cfg.model_dump(mode="json")) as parent:
        for spec in specs:
            outcomes[spec.name] = _run_one(cfg, spec, spec.name in force, listing, tracker, parent)
        parent.log_dict(
            {stage: outcome.manifest.fingerprint for stage, outcome in outcomes.items()},
            "stages.json",
        )
    return outcomes


def _up_to_date(cfg: PipelineConfig, spec: StageSpec, fp: str) -> StageManifest | None:
    """The stage's manifest when it is complete with fingerprint ``fp``, else None."""
    try:
        existing = read_manifest(cfg.output_dir, spec.manifest)
    except ManifestError as err:
        log.info("== %s: its manifest cannot be used (%s); the stage runs again", spec.name, err)
        return None
    return existing if existing is not None and existing.fingerprint == fp else None


def _run_one(
    cfg: PipelineConfig,
    spec: StageSpec,
    forced: bool,
    listing: str | None,
    tracker: Tracker,
    parent: TrackingContext,
) -> StageOutcome:
    stage_dir = spec.manifest.directory(cfg.output_dir)
    fp = stage_fingerprint(cfg, spec, listing)
    manifest_fp = manifest_fingerprint(spec, fp, listing)
    existing = None if forced else _up_to_date(cfg, spec, manifest_fp)
    if existing is not None:
        log.info("== %s: up to date (fingerprint %s), skipped", spec.name, manifest_fp)
        console.current().stage_skipped(spec.name, existing.summary())
        parent.set_tags({f"vqpipe.{spec.name}": "skipped"})
        return StageOutcome(existing, skipped=True)

    log.info("== %s: running (fingerprint %s)", spec.name, manifest_fp)
    console.current().stage_started(spec.name, spec.description)
    started = time.time()
    try:
        outcome = _run_stage(
            cfg, spec, forced, listing, tracker, parent, stage_dir, fp, manifest_fp
        )
    except BaseException:
        console.current().stage_failed(spec.name, time.time() - started)
        raise
    console.current().stage_finished(
        spec.name, outcome.manifest.seconds, outcome.manifest.summary()
    )
    return outcome


def _run_stage(
    cfg: PipelineConfig,
    spec: StageSpec,
    forced: bool,
    listing: str | None,
    tracker: Tracker,
    parent: TrackingContext,
    stage_dir: str,
    fp: str,
    manifest_fp: str,
) -> StageOutcome:
    if spec.check_inputs is not None:
        # Upstream files that may have changed since they were written (a shard, a checkpoint)
        # are checked before the stage's last outputs are cleared for this run, and before Ray
        # starts: a bad input or setting fails in a moment.
        spec.check_inputs(cfg)
    ensure_ray(cfg)
    _prepare_stage_dir(stage_dir, fp, forced)
    started = time.time()
    with tracker.stage_run(spec.name) as tracking:
        dumped = cfg.model_dump(mode="json")
        tracking.log_params({k: dumped[k] for k in spec.reads if k != "seed"} | {"seed": cfg.seed})
        view = ConfigView(cfg, spec.name, spec.reads)
        ctx = StageContext(
            cfg=view, stage=spec.name, stage_dir=stage_dir, fingerprint=fp, tracking=tracking
        )
        result = spec.run(ctx)
        if not isinstance(result, spec.manifest):
            raise TypeError(
                f"stage {spec.name!r} returned a {type(result).__name__}, "
                f"expected {spec.manifest.__name__}"
            )
        manifest = write_manifest(
            cfg.output_dir,
            result.model_copy(
                update={
                    "fingerprint": manifest_fp,
                    "inputs": stage_inputs(cfg, spec, listing),
                    "mlflow_run_id": tracking.run_id,
                    "seconds": round(time.time() - started, 2),
                }
            ),
        )
        tracking.log_dict(manifest.model_dump(mode="json"), "manifest.json")
    parent.set_tags({f"vqpipe.{spec.name}": "ran"})
    log.info("== %s: done in %.1f s", spec.name, time.time() - started)
    return StageOutcome(manifest, skipped=False, sections_read=frozenset(view.read))
