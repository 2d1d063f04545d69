"""Stage manifests: what a stage wrote, from which inputs. One typed model per stage.

Every stage ends by writing ``<output_dir>/<stage>/manifest.json``, a JSON document validated by
that stage's ``StageManifest`` subclass (declared beside the stage's ``run``). Every manifest
carries a fingerprint of the stage's config and of its upstream manifests; the runner skips a
stage whose manifest exists with the same fingerprint, so re-running a pipeline redoes nothing.

A manifest is written only once its stage has finished, atomically, so one that exists is
complete. Readers ask for a manifest by its type, ``read_manifest(output_dir, TokenizeManifest)``,
and get a validated object, or a ``ManifestError`` that says whether it is missing, incomplete or
of another format version.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from pipelines.data import storage
from pipelines.errors import ManifestError

MANIFEST_NAME = "manifest.json"
FORMAT = "vqpipe.manifest"

M = TypeVar("M", bound="StageManifest")


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def format_metrics(metrics: dict[str, float], names: list[str] | tuple[str, ...]) -> str:
    """``a=1.23, b=4.56`` for the named metrics that are present."""
    return ", ".join(f"{k}={metrics[k]:.4g}" for k in names if k in metrics)


def cli_verb(stage: str) -> str:
    """The CLI command of a stage: ``train_vqvae`` -> ``train-vqvae``."""
    return stage.replace("_", "-")


class ManifestModel(BaseModel):
    """A part of a manifest: unknown fields are errors, so a renamed field cannot pass silently."""

    model_config = ConfigDict(extra="forbid")


class StageManifest(ManifestModel):
    """The fields every stage's manifest carries; each stage subclasses it with its own.

    ``stage`` names the stage (and its folder under ``output_dir``); ``version`` is the format
    version of the subclass' fields: bump it when they change incompatibly.
    """

    stage: ClassVar[str] = ""
    version: ClassVar[int] = 1

    # Filled in by the runner when the stage finishes.
    fingerprint: str = ""
    inputs: dict[str, str] = {}  # a hash per input (config section, upstream stage, corpus)
    mlflow_run_id: str | None = None
    seconds: float = 0.0
    written_at: str = ""

    def summary(self) -> str:
        """One line for the CLI about what the stage produced."""
        return ""

    @classmethod
    def directory(cls, output_dir: str) -> str:
        """Where the stage writes: ``<output_dir>/<stage>``."""
        return storage.join(output_dir, cls.stage)

    @classmethod
    def uri(cls, output_dir: str) -> str:
        return storage.join(cls.directory(output_dir), MANIFEST_NAME)


def write_manifest(output_dir: str, manifest: M) -> M:
    """Write ``manifest`` atomically as JSON under its stage's folder; returns what was written."""
    written = manifest.model_copy(
        update={"written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    )
    document = {
        "format": FORMAT,
        "stage": type(manifest).stage,
        "version": type(manifest).version,
        **written.model_dump(mode="json"),
    }
    storage.write_bytes(
        type(manifest).uri(output_dir), json.dumps(document, indent=2, sort_keys=True).encode()
    )
    return written


def read_manifest(output_dir: str, cls: type[M]) -> M | None:
    """The stage's manifest, or None when the stage never finished.

    Raises ManifestError when a manifest is there but cannot be trusted: not JSON, of another
    stage or format version, or missing fields this version needs.
    """
    return read_manifest_at(cls.uri(output_dir), cls)


def read_manifest_at(uri: str, cls: type[M]) -> M | None:
    """``read_manifest`` for a manifest file anywhere (another run's stage folder)."""
    if not storage.exists(uri):
        return None
    try:
        document = json.loads(storage.read_bytes(uri))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(
            f"{uri} is incomplete or damaged (not valid JSON: {err}); delete it to redo the "
            f"{cls.stage} stage"
        ) from None
    if not isinstance(document, dict):
        raise ManifestError(f"{uri} holds a {type(document).__name__}, not a manifest")
    found = (
        document.pop("format", None),
        document.pop("stage", None),
        document.pop("version", None),
    )
    expected = (FORMAT, cls.stage, cls.version)
    if found != expected:
        raise ManifestError(
            f"{uri} is a manifest of format {found[0]!r}, stage {found[1]!r}, version {found[2]!r}; "
            f"this vqpipe reads format {FORMAT!r}, stage {cls.stage!r}, version {cls.version}. "
            f"Redo the stage: vqpipe {cli_verb(cls.stage)} CONFIG --force"
        )
    try:
        return cls.model_validate(document)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in err.errors()
        )
        raise ManifestError(
            f"{uri} is incomplete or malformed ({problems}); redo the stage: "
            f"vqpipe {cli_verb(cls.stage)} CONFIG --force"
        ) from None


def require_manifest(output_dir: str, cls: type[M]) -> M:
    """The upstream stage's manifest; a clear error when that stage has not run."""
    manifest = read_manifest(output_dir, cls)
    if manifest is None:
        raise ManifestError(
            f"stage {cls.stage!r} has no manifest at {cls.uri(output_dir)}; "
            f"run `vqpipe {cli_verb(cls.stage)}` first"
        )
    return manifest
