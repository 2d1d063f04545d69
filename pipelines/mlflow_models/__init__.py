"""The pipeline's models as MLflow models: logged, registered, and loaded back by ``models:/`` URI.

Each model is an MLflow pyfunc defined from code (``tokenizer.py``, ``prior.py`` beside this file),
so nothing is pickled: the model's one artifact is the vq_core checkpoint, which loads with
``torch.load(weights_only=True)``. ``log_model`` logs one to a stage's run and registers it under a
name from the config (``mlflow.registered_models``); ``resolve_checkpoint`` turns a ``models:/``
URI into the local path of that checkpoint, so every command that takes a checkpoint path also
takes a registered model.
"""

from __future__ import annotations

import logging
import os
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np

log = logging.getLogger("vqpipe")

CHECKPOINT_ARTIFACT = "checkpoint"
# The inference-time params each flavor reads, with their defaults.
PARAMS: dict[str, dict[str, Any]] = {"prior": {"seed": 0, "temperature": 1.0, "guidance": 1.0}}
_CODE = os.path.dirname(os.path.abspath(__file__))


def _requirements() -> list[str]:
    # Given explicitly: MLflow's inference of requirements imports the model and is slow.
    pins = []
    for package in ("torch", "numpy", "vqpipe"):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def log_model(
    tracking_uri: str,
    run_id: str,
    flavor: str,
    checkpoint_path: str,
    input_example: dict[str, np.ndarray] | np.ndarray,
    output_example: Any,
    registered_name: str | None,
    name: str,
) -> str | None:
    """Log the checkpoint as a pyfunc of ``flavor`` ("tokenizer" or "prior") to ``run_id``;
    register it under ``registered_name`` when given. Returns the ``models:/name/version`` URI."""
    import mlflow
    from mlflow.models import infer_signature

    mlflow.set_tracking_uri(tracking_uri)
    # Inference-time params must be in the signature, or MLflow drops them.
    params = PARAMS.get(flavor)
    signature = infer_signature(input_example, output_example, params=params)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=os.path.join(_CODE, f"{flavor}.py"),
            artifacts={CHECKPOINT_ARTIFACT: checkpoint_path},
            signature=signature,
            input_example=input_example,
            pip_requirements=_requirements(),
            registered_model_name=registered_name,
        )
    if registered_name is None:
        return None
    uri = f"models:/{registered_name}/{info.registered_model_version}"
    log.info("registered %s as %s", name, uri)
    return uri


def log_checkpoint_model(
    tracking: Any,
    flavor: str,
    checkpoint: bytes,
    input_example: dict[str, np.ndarray] | np.ndarray,
    output_example: Any,
    registered_name: str | None,
    name: str,
) -> str | None:
    """``log_model`` for checkpoint bytes (the checkpoint may live in an object store)."""
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, f"{name}.pt")
        with open(path, "wb") as f:
            f.write(checkpoint)
        return log_model(
            tracking.tracking_uri,
            tracking.run_id,
            flavor,
            path,
            input_example,
            output_example,
            registered_name,
            name,
        )


def is_model_uri(uri: str) -> bool:
    return uri.startswith("models:/")


def resolve_checkpoint(uri: str, tracking_uri: str | None = None) -> str:
    """The local path of the vq_core checkpoint a ``models:/<name>/<version or alias>`` URI holds;
    any other path or URL is returned as it is."""
    if not is_model_uri(uri):
        return uri
    import mlflow

    from pipelines.errors import InputError

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri)
    except Exception as err:  # MlflowException for an unknown name, version or alias
        raise InputError(f"cannot load the registered model {uri!r}: {err}") from None
    found = os.path.join(local, "artifacts", os.path.basename(_artifact_name(local)))
    if not os.path.isfile(found):
        raise InputError(f"{uri!r} is not a vqpipe model: it has no {CHECKPOINT_ARTIFACT} artifact")
    return found


def _artifact_name(model_dir: str) -> str:
    """The file name the checkpoint artifact was logged under (from the MLmodel file)."""
    import yaml

    with open(os.path.join(model_dir, "MLmodel")) as f:
        spec = yaml.safe_load(f)
    artifacts = spec.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    entry = artifacts.get(CHECKPOINT_ARTIFACT, {})
    return entry.get("path", "") if isinstance(entry, dict) else str(entry)
