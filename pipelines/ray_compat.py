"""The Ray Train internals vqpipe relies on, looked up in this one module.

Ray has no public API for two things ``pipelines.training`` needs to bound how long a training
stage waits for room for its workers (``ray.resource_wait_seconds``):

- ``ControllerCallback``: a callback that runs in Ray Train's controller and sees its state
  changes. The public ``ray.train.UserCallback`` sees only reports and worker exceptions, not a
  worker group that never started;
- ``WorkerGroupStartupTimeoutError``: what the controller records when that wait expires.

Nor for leaving out the helper actors Ray Train starts in every run, each a process of its own,
where the run has no use for them (``pipelines.training.LeanTorchTrainer``):

- ``DatasetsCallback``: starts a ``DatasetManager`` actor to hand out Ray Data shards, even to a
  run given no datasets;
- ``PlacementGroupCleanerCallback``: starts a detached actor that removes the run's placement
  group should the controller die while the Ray it ran on lives on;
- ``DataParallelTrainer._create_default_callbacks``: where the trainer lists them.

Names under ``ray.*._internal`` are not API and can move in any minor release. They are resolved
here, when this module is imported, so that a Ray without them fails at once, naming the version
found and the versions vqpipe is tested with, rather than in the middle of a training run. No other
module of the project imports ``ray.*._internal`` (tests/pipelines/test_ray_compat.py checks).
"""

from __future__ import annotations

import importlib
from typing import Any

import ray

from pipelines.errors import UnsupportedRayError

# The Ray releases vqpipe is tested with; pyproject.toml pins the same range (a test checks).
OLDEST_RAY = "2.60"
NEWEST_RAY = "2.60"

# name -> the module of the installed Ray it comes from
INTERNALS = {
    "ControllerCallback": "ray.train.v2._internal.execution.callback",
    "WorkerGroupStartupTimeoutError": "ray.train.v2._internal.exceptions",
    "DatasetsCallback": "ray.train.v2._internal.callbacks.datasets",
    "PlacementGroupCleanerCallback": "ray.train.v2._internal.callbacks.placement_group_callback",
}

# name -> the Ray class whose private method it is
METHODS = {
    "_create_default_callbacks": "ray.train.v2.api.data_parallel_trainer.DataParallelTrainer"
}


def resolve(name: str, module: str) -> Any:
    """``module.name`` from the installed Ray, or an ``UnsupportedRayError`` that says which Ray
    is installed and which releases vqpipe supports."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise _unsupported(f"{module}.{name}", f"{type(err).__name__}: {err}") from err


def _unsupported(what: str, detail: str) -> UnsupportedRayError:
    """The error for a Ray that lacks ``what``: the Ray found and the releases vqpipe supports."""
    return UnsupportedRayError(
        f"vqpipe needs {what} from Ray Train, and the installed Ray {ray.__version__} does not "
        f"have it ({detail}). vqpipe supports Ray {OLDEST_RAY} to {NEWEST_RAY}: install one of "
        f'those (pip install "ray[default,train,data]>={OLDEST_RAY},<{_next_minor(NEWEST_RAY)}")'
    )


def resolve_internals() -> dict[str, Any]:
    """Every name in ``INTERNALS``, resolved, and every method of ``METHODS`` checked to exist."""
    resolved = {name: resolve(name, module) for name, module in INTERNALS.items()}
    for method, owner in METHODS.items():
        module, cls = owner.rsplit(".", 1)
        if not callable(getattr(resolve(cls, module), method, None)):
            raise _unsupported(f"{owner}.{method}", f"{cls} has no method {method}")
    return resolved


def _next_minor(version: str) -> str:
    major, minor = version.split(".")[:2]
    return f"{major}.{int(minor) + 1}"


_resolved = resolve_internals()
ControllerCallback = _resolved["ControllerCallback"]
WorkerGroupStartupTimeoutError = _resolved["WorkerGroupStartupTimeoutError"]
DatasetsCallback = _resolved["DatasetsCallback"]
PlacementGroupCleanerCallback = _resolved["PlacementGroupCleanerCallback"]
