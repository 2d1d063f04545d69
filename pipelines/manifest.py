"""Stage manifests: what a stage wrote, from which inputs, and whether it finished.

Every stage ends by writing ``<output_dir>/<stage>/manifest.json``. The manifest carries a
fingerprint of the stage's config and of its upstream manifests; the runner skips a stage whose
manifest is complete and has the same fingerprint, so re-running a pipeline redoes nothing.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from pipelines import storage

MANIFEST_NAME = "manifest.json"
FORMAT = "vqpipe.manifest/1"


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def manifest_uri(stage_dir: str) -> str:
    return storage.join(stage_dir, MANIFEST_NAME)


def write_manifest(stage_dir: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write ``manifest`` atomically as JSON; returns what was written."""
    out = {
        "format": FORMAT,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **manifest,
    }
    storage.write_bytes(manifest_uri(stage_dir), json.dumps(out, indent=2, sort_keys=True).encode())
    return out


def read_manifest(stage_dir: str) -> dict[str, Any] | None:
    """The stage's manifest, or None when the stage never finished."""
    uri = manifest_uri(stage_dir)
    if not storage.exists(uri):
        return None
    try:
        manifest = json.loads(storage.read_bytes(uri))
    except json.JSONDecodeError as err:
        raise ValueError(f"{uri} is not valid JSON ({err}); delete it to redo the stage") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{uri} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def require_manifest(stage_dir: str, stage: str) -> dict[str, Any]:
    """The upstream stage's manifest; a clear error when that stage has not run."""
    manifest = read_manifest(stage_dir)
    if manifest is None or not manifest.get("complete"):
        raise FileNotFoundError(
            f"stage {stage!r} has no complete manifest at {manifest_uri(stage_dir)}; run `vqpipe {stage.replace('_', '-')}` first"
        )
    return manifest
