"""The autoencoder that tokenize encodes with, and how code shards name it.

Two sources: this run's train_vqvae (the default), or a checkpoint pinned by
``tokenize.checkpoint``: a path or URL of a vq_core checkpoint, or a registered MLflow model
``models:/<name>/<version or @alias>``. Either way the tokenizer's identity is the sha256 of the
checkpoint's bytes: the tokenize stage's fingerprint follows it (a new tokenizer re-encodes the
corpus), its manifest records it, and code shards made with different tokenizers are never
trained on together.

A ``models:/`` URI is pinned at the version it names when tokenize runs (an alias is resolved
then), so later stages decode with the same weights even if the alias moves.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from typing import Any

from pipelines.checkpoint_meta import CheckpointMeta, load_with_meta
from pipelines.data import storage
from pipelines.errors import InputError, MissingInputError
from pipelines.manifest import ManifestModel

# Resolved tokenizers of this process, so that fingerprinting, checking and running a stage read
# a pinned checkpoint once. Keyed by what identifies the bytes without reading them.
_CACHE: dict[tuple, PinnedTokenizer] = {}
_CACHE_SIZE = 4


class TokenizerIdentity(ManifestModel):
    """Which autoencoder made a set of code shards: where its checkpoint is read, and the sha256
    of the checkpoint's bytes; the registered model's name and version when it came from the
    MLflow registry."""

    checkpoint: str  # a path or URL, or models:/<name>/<version>
    sha256: str
    model_name: str | None = None
    model_version: str | None = None

    def describe(self) -> str:
        return f"{self.checkpoint} (sha256 {self.sha256[:16]})"


@dataclass(frozen=True)
class PinnedTokenizer:
    """A tokenizer checkpoint read and checked: its identity, bytes, what it was trained on."""

    identity: TokenizerIdentity
    data: bytes
    model: Any  # the autoencoder, on the CPU, in eval mode
    levels: tuple[str, ...]
    image_size: tuple[int, int] | None  # recorded in the checkpoint, when it is
    channels: int

    def check_fits(self, size_hw: tuple[int, int], channels: int, where: str) -> None:
        """Raise InputError unless the tokenizer encodes images of ``size_hw`` and ``channels``."""
        size_ok = self.image_size is None or tuple(self.image_size) == tuple(size_hw)
        if size_ok and self.channels == channels:
            return
        trained = f"{list(self.image_size)} images" if self.image_size else "images"
        raise InputError(
            f"{where} asks for {list(size_hw)} images with {channels} channel(s), but the "
            f"tokenizer {self.identity.describe()} encodes {trained} with {self.channels} "
            "channel(s); set data.image_size and data.channels to match the tokenizer"
        )


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tracking_uri_for(cfg: Any) -> str | None:
    """The MLflow server a ``models:/`` URI is looked up on: mlflow.tracking_uri, else
    MLFLOW_TRACKING_URI."""
    return cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def autoencoder_from_bytes(
    data: bytes, what: str, map_location: Any = "cpu"
) -> tuple[Any, CheckpointMeta]:
    """(model, metadata) of a vq_core autoencoder checkpoint; InputError naming ``what`` and what
    was found otherwise."""
    try:
        model, meta = load_with_meta(io.BytesIO(data), map_location=map_location)
    except (ValueError, RuntimeError) as err:
        raise InputError(f"{what} is not a vq_core checkpoint: {err}") from None
    if not hasattr(model, "encode") or not hasattr(model, "decode_codes"):
        raise InputError(
            f"{what} holds a {type(model).__name__}, not an autoencoder (VQ-VAE-2, VQ-VAE or dVAE)"
        )
    return model, meta


def _registered_version(uri: str, tracking_uri: str | None) -> tuple[str, str]:
    """(name, version) a ``models:/<name>/<version or @alias>`` URI names now."""
    from mlflow import MlflowClient

    rest = uri[len("models:/") :]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        name = name.rstrip("/")
    else:
        name, _, version = rest.partition("/")
        alias = None
    if not name or (alias is None and not version):
        raise InputError(
            f"tokenize.checkpoint {uri!r} must look like models:/<name>/<version> or "
            "models:/<name>@<alias>"
        )
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        if alias is not None:
            return name, str(client.get_model_version_by_alias(name, alias).version)
        if version == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise InputError(f"registered model {name!r} has no versions")
            return name, str(max(int(v.version) for v in versions))
        client.get_model_version(name, version)
    except InputError:
        raise
    except Exception as err:  # MlflowException for an unknown name, version or alias
        raise InputError(f"cannot load the registered model {uri!r}: {err}") from None
    return name, version


def _cache_key(checkpoint: str, tracking_uri: str | None) -> tuple:
    if checkpoint.startswith("models:/"):
        name, version = _registered_version(checkpoint, tracking_uri)
        return ("registry", name, version, tracking_uri)
    if not storage.exists(checkpoint):
        raise MissingInputError(f"tokenize.checkpoint {checkpoint!r} does not exist")
    fs, path = storage.resolve(checkpoint)
    info = fs.get_file_info(path)
    return ("file", checkpoint, info.size, info.mtime_ns)


def read_tokenizer(checkpoint: str, tracking_uri: str | None = None) -> PinnedTokenizer:
    """Read and check the autoencoder at a path, URL or ``models:/`` URI.

    MissingInputError when it does not exist; InputError when it is not a vq_core autoencoder
    (a prior, another file) or the registered model cannot be found."""
    key = _cache_key(checkpoint, tracking_uri)
    if key in _CACHE:
        return _CACHE[key]
    name = version = None
    where = checkpoint
    if key[0] == "registry":
        import mlflow

        from pipelines.mlflow_models import resolve_checkpoint

        name, version = key[1], key[2]
        where = f"models:/{name}/{version}"
        # resolve_checkpoint points MLflow's global tracking URI at the registry; the stage's
        # own tracking must keep going where it went.
        previous = mlflow.get_tracking_uri()
        try:
            path = resolve_checkpoint(where, tracking_uri)
        finally:
            mlflow.set_tracking_uri(previous)
    else:
        path = checkpoint
    if storage.is_dir(path):
        raise InputError(f"tokenize.checkpoint {checkpoint!r} is a folder, not a checkpoint file")
    data = storage.read_bytes(path)
    model, meta = autoencoder_from_bytes(data, f"tokenize.checkpoint {checkpoint!r}")
    size = meta.image_size
    pinned = PinnedTokenizer(
        identity=TokenizerIdentity(
            checkpoint=where, sha256=sha256_of(data), model_name=name, model_version=version
        ),
        data=data,
        model=model,
        levels=tuple(model.levels),
        image_size=(int(size[0]), int(size[-1])) if size else None,
        channels=int(model.config.in_channels),
    )
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = pinned
    return pinned


def read_identified(identity: TokenizerIdentity, tracking_uri: str | None = None) -> bytes:
    """The checkpoint bytes a manifest's tokenizer identity names, checked against its sha256
    (codes decoded with other weights would be silently wrong)."""
    if identity.checkpoint.startswith("models:/"):
        data = read_tokenizer(identity.checkpoint, tracking_uri).data
    else:
        if not storage.exists(identity.checkpoint):
            raise MissingInputError(
                f"the tokenizer checkpoint {identity.checkpoint!r} the code shards were made with "
                "no longer exists"
            )
        data = storage.read_bytes(identity.checkpoint)
    found = sha256_of(data)
    if found != identity.sha256:
        raise InputError(
            f"the tokenizer checkpoint {identity.checkpoint!r} changed since the code shards were "
            f"made (sha256 {found[:16]}, the shards were made with {identity.sha256[:16]}); "
            "redo tokenize with it, or restore the checkpoint"
        )
    return data
