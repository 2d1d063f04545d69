"""Where each stage of a pipeline stands, without running anything: ``vqpipe status CONFIG``.

A stage is *done* when its manifest carries the fingerprint it would get now; *stale* when a
manifest is there but an input changed (the inputs recorded in the manifest say which), or when
a stage it reads is not done; *partial* when an interrupted run left work in its folder (which
the next run resumes); *not started* otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.config import PipelineConfig
from pipelines.data import storage
from pipelines.data.shards import is_shard
from pipelines.errors import ManifestError
from pipelines.manifest import fingerprint, read_manifest
from pipelines.runner import (
    FINGERPRINT_FILE,
    manifest_fingerprint,
    stage_fingerprint,
    stage_inputs,
)
from pipelines.stages import STAGES


@dataclass(frozen=True)
class StageStatus:
    stage: str
    state: str  # "done", "stale", "partial", "not started" or "disabled"
    detail: str = ""


def _progress(stage_dir: str) -> str:
    """What an interrupted run left: files written and the last training checkpoint."""
    files = [f for f in storage.list_files(stage_dir) if not f.endswith(FINGERPRINT_FILE)]
    steps = sorted(
        int(part[len("step-") :])
        for f in files
        for part in f.split("/")
        if part.startswith("step-") and part[len("step-") :].isdigit()
    )
    shards = sum(is_shard(f) for f in files)
    parts = [f"{len(files)} file(s) written"]
    if shards:
        parts.append(f"{shards} shard(s)")
    if steps:
        parts.append(f"last checkpoint at step {steps[-1]}")
    return ", ".join(parts)


def pipeline_status(cfg: PipelineConfig) -> list[StageStatus]:
    listing = None
    if storage.exists(cfg.data.source) and any(spec.reads_corpus for spec in STAGES):
        listing = fingerprint(storage.listing_fingerprint(cfg.data.source))
    statuses: dict[str, StageStatus] = {}
    for spec in STAGES:
        if not spec.enabled(cfg):
            statuses[spec.name] = StageStatus(spec.name, "disabled")
            continue
        waiting = [up.stage for up in spec.upstream_of(cfg) if statuses[up.stage].state != "done"]
        try:
            manifest = read_manifest(cfg.output_dir, spec.manifest)
        except ManifestError as err:
            statuses[spec.name] = StageStatus(spec.name, "stale", str(err))
            continue
        stage_dir = spec.manifest.directory(cfg.output_dir)
        if manifest is None:
            if storage.exists(storage.join(stage_dir, FINGERPRINT_FILE)):
                state = StageStatus(spec.name, "partial", _progress(stage_dir))
            else:
                state = StageStatus(spec.name, "not started")
        elif waiting:
            state = StageStatus(spec.name, "stale", f"after {', '.join(waiting)}")
        elif manifest.fingerprint == manifest_fingerprint(
            spec, stage_fingerprint(cfg, spec, listing), listing
        ):
            state = StageStatus(spec.name, "done", manifest.summary())
        else:
            now = stage_inputs(cfg, spec, listing)
            changed = sorted(
                k
                for k in now.keys() | manifest.inputs.keys()
                if now.get(k) != manifest.inputs.get(k)
            )
            state = StageStatus(spec.name, "stale", f"changed: {', '.join(changed)}")
        statuses[spec.name] = state
    return list(statuses.values())


def format_status(statuses: list[StageStatus]) -> str:
    width = max(len(s.stage) for s in statuses)
    return "\n".join(f"  {s.stage:<{width}}  {s.state:<11}  {s.detail}".rstrip() for s in statuses)
