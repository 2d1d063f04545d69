"""The one checkpoint format for every vq_core model.

A checkpoint is a torch.save'd dict holding only tensors and plain Python values, so it loads with
torch.load(weights_only=True) and never executes pickled code:

    {"format": "vq_core.checkpoint/1",
     "model": "VQVAE2",                   # a model class of vq_core.kinds.KINDS
     "config": {...},                     # dataclasses.asdict(model.config)
     "state_dict": {...},                 # parameters and buffers (EMA statistics included)
     "extra": {...} | None}               # caller's plain data: step, metrics, data description

A model class is rebuilt as Class(Class.config_class(**config)); every registered class therefore
has a dataclass config, a `.config` attribute and a `config_class` class attribute. Classes are
imported lazily so that loading an autoencoder does not import the priors, and vice versa.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
from typing import Any, BinaryIO

import torch
from torch import nn

from vq_core.kinds import KINDS, kind_of_class

FORMAT = "vq_core.checkpoint/1"

# Checkpoint model name -> "module:Class", from the one table of model kinds.
MODEL_REGISTRY: dict[str, str] = {kind.class_name: kind.target for kind in KINDS.values()}

PathOrBuffer = str | os.PathLike | BinaryIO

# What torch.load(weights_only=True) can rebuild, besides tensors.
_PLAIN_TYPES = (str, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)


def model_class(name: str) -> type[nn.Module]:
    """The model class registered under `name`."""
    return kind_of_class(name).model_class


def model_from_config(name: str, config: dict[str, Any]) -> nn.Module:
    """A freshly initialised model of the registered class `name` built from a config dict."""
    cls = model_class(name)
    config_class = cls.config_class
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(
            f"config for {name} has unknown keys {unknown}; {config_class.__name__} accepts "
            f"{sorted(known)}"
        )
    return cls(config_class(**config))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DDP, DataParallel or torch.compile wrappers."""
    # DistributedDataParallel / DataParallel keep the model in .module, torch.compile in
    # ._orig_mod; their state_dict keys carry prefixes that the bare class would not accept.
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _check_plain(value: Any, where: str) -> None:
    """Refuse at save time what weights_only loading would refuse later."""
    if isinstance(value, torch.Tensor) or isinstance(value, _PLAIN_TYPES):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where} has a key of type {type(k).__name__}; use str or int")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__name__}; checkpoints hold only tensors, numbers, strings, "
        f"booleans, None and lists/tuples/dicts of them"
    )


def _registered_name(model: nn.Module) -> str:
    for name, target in MODEL_REGISTRY.items():
        module_name, class_name = target.split(":")
        cls = type(model)
        if cls.__module__ == module_name and cls.__name__ == class_name:
            return name
    raise ValueError(
        f"model class {type(model).__module__}.{type(model).__name__} is not in the checkpoint "
        f"registry; known models: {', '.join(sorted(MODEL_REGISTRY))}"
    )


def save_checkpoint(
    model: nn.Module, path_or_buffer: PathOrBuffer, extra: dict[str, Any] | None = None
) -> None:
    """Write model (class name, config, parameters and buffers) and `extra` to a file or buffer."""
    model = unwrap_model(model)
    name = _registered_name(model)
    config = getattr(model, "config", None)
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise ValueError(f"{name} has no dataclass .config; got {type(config).__name__}")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict or None, got {type(extra).__name__}")
    payload = {
        "format": FORMAT,
        "model": name,
        "config": dataclasses.asdict(config),
        # On CPU so a checkpoint written on a GPU machine loads anywhere without map_location.
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra,
    }
    _check_plain(payload["config"], "config")
    _check_plain(extra, "extra")
    if isinstance(path_or_buffer, (str, os.PathLike)):
        # Write then rename: a job killed mid-save must not leave a truncated checkpoint behind
        # under the final name.
        tmp = f"{os.fspath(path_or_buffer)}.tmp"
        torch.save(payload, tmp)
        os.replace(tmp, path_or_buffer)
    else:
        torch.save(payload, path_or_buffer)


def _describe(path_or_buffer: PathOrBuffer) -> str:
    if isinstance(path_or_buffer, (str, os.PathLike)):
        return os.fspath(path_or_buffer)
    return f"<{type(path_or_buffer).__name__}>"


def _starts_like_zip(path_or_buffer: PathOrBuffer) -> bool:
    # torch.save has written zip archives since torch 1.6, and so does save_checkpoint. Anything
    # else would go to torch's legacy unpickler, whose errors say nothing useful about the file.
    if isinstance(path_or_buffer, (str, os.PathLike)):
        with open(path_or_buffer, "rb") as f:
            head = f.read(4)
    else:
        position = path_or_buffer.tell()
        head = path_or_buffer.read(4)
        path_or_buffer.seek(position)
    return head == b"PK\x03\x04"


def _read(path_or_buffer: PathOrBuffer | bytes, map_location: Any) -> Any:
    if isinstance(path_or_buffer, (bytes, bytearray)):
        path_or_buffer = io.BytesIO(path_or_buffer)
    where = _describe(path_or_buffer)
    if not _starts_like_zip(path_or_buffer):
        raise ValueError(f"{where} is not a readable checkpoint file: not a torch.save archive")
    try:
        return torch.load(path_or_buffer, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch reports objects outside the weights-only allow-list this way.
        raise ValueError(
            f"{where} holds objects other than tensors and plain values; refusing to unpickle "
            f"them (checkpoints load with weights_only=True). Details: {e}"
        ) from e
    except Exception as e:
        # A truncated or damaged archive fails in many places inside torch.load (RuntimeError,
        # EOFError, ValueError from a seek, ...); all of them mean the same thing to the caller.
        raise ValueError(f"{where} is not a readable checkpoint file: {e}") from e


def _normalise(value: Any) -> Any:
    # Configs round-trip tuples as tuples, but expected configs often come from YAML or JSON,
    # which only know lists.
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    return value


def _check_expected_config(name: str, stored: dict[str, Any], expected: dict[str, Any]) -> None:
    differences = []
    for key in sorted(expected):
        if key not in stored:
            differences.append(f"{key}: expected {expected[key]!r}, checkpoint has no such key")
        elif _normalise(stored[key]) != _normalise(expected[key]):
            differences.append(f"{key}: expected {expected[key]!r}, checkpoint has {stored[key]!r}")
    if differences:
        raise ValueError(
            f"{name} checkpoint config differs from the expected one: " + "; ".join(differences)
        )


def _with_stored_defaults(name: str, config: dict[str, Any]) -> dict[str, Any]:
    # A field added to a config after checkpoints were written gets, when such a checkpoint is
    # loaded, the value the older code implied (the config class's `stored_defaults`), which may
    # differ from the default a new model gets.
    implied = getattr(model_class(name).config_class, "stored_defaults", {})
    return {**{k: v for k, v in implied.items() if k not in config}, **config}


def _load_state(model: nn.Module, name: str, state_dict: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    problems = []
    for key in sorted(set(own) - set(state_dict)):
        problems.append(f"{key}: missing from checkpoint (model expects {tuple(own[key].shape)})")
    for key in sorted(set(state_dict) - set(own)):
        problems.append(f"{key}: in checkpoint ({tuple(state_dict[key].shape)}) but not in model")
    for key in sorted(set(own) & set(state_dict)):
        if own[key].shape != state_dict[key].shape:
            problems.append(
                f"{key}: checkpoint has shape {tuple(state_dict[key].shape)}, the model built "
                f"from the stored config has {tuple(own[key].shape)}"
            )
    if problems:
        raise ValueError(f"{name} state_dict does not fit its config: " + "; ".join(problems))
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{name} state_dict does not fit its config: {e}") from e


def load_checkpoint(
    path_or_buffer: PathOrBuffer | bytes,
    map_location: Any = "cpu",
    expected_model: str | None = None,
    expected_config: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any] | None]:
    """Rebuild a model from a checkpoint; returns (model in eval mode, extra).

    expected_model / expected_config guard against loading the wrong file: every key given in
    expected_config must match the stored config (tuples and lists compare equal).
    """
    payload = _read(path_or_buffer, map_location)
    where = _describe(path_or_buffer)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{where} is not a {FORMAT} checkpoint (format: {found!r})")
    missing = [k for k in ("model", "config", "state_dict", "extra") if k not in payload]
    if missing:
        raise ValueError(f"{where} lacks the checkpoint fields {missing}")
    name = payload["model"]
    if expected_model is not None and name != expected_model:
        raise ValueError(f"{where} holds a {name} model, expected {expected_model}")
    config = _with_stored_defaults(name, payload["config"])
    if expected_config is not None:
        _check_expected_config(name, config, expected_config)
    model = model_from_config(name, config)
    _load_state(model, name, payload["state_dict"])
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.eval(), payload["extra"]
