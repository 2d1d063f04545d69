"""Ray's internals are reached through pipelines.ray_compat alone, and a Ray without one of them
fails there with a message naming the Ray found and the Ray releases vqpipe supports."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import ray

from pipelines import ray_compat
from pipelines.errors import UnsupportedRayError, UserError

ROOT = Path(__file__).resolve().parents[2]
ADAPTER = ROOT / "pipelines" / "ray_compat.py"


def test_only_the_adapter_mentions_ray_internals():
    sources = [
        p for package in ("pipelines", "jobs") for p in sorted((ROOT / package).rglob("*.py"))
    ]
    assert ADAPTER in sources
    offenders = [
        str(p.relative_to(ROOT)) for p in sources if p != ADAPTER and "_internal" in p.read_text()
    ]
    assert offenders == [], f"import Ray's internals through pipelines.ray_compat: {offenders}"


def test_the_adapter_resolves_every_name_on_the_installed_ray():
    names = ray_compat.resolve_internals()
    assert set(names) == set(ray_compat.INTERNALS)
    assert isinstance(ray_compat.ControllerCallback, type)
    assert issubclass(ray_compat.WorkerGroupStartupTimeoutError, Exception)


def check_message(message: str, missing: str) -> None:
    assert missing in message, message
    assert f"the installed Ray {ray.__version__} does not have it" in message, message
    assert f"Ray {ray_compat.OLDEST_RAY} to {ray_compat.NEWEST_RAY}" in message, message


def test_a_name_missing_from_its_module_fails_with_the_versions(monkeypatch):
    module = importlib.import_module(ray_compat.INTERNALS["WorkerGroupStartupTimeoutError"])
    monkeypatch.delattr(module, "WorkerGroupStartupTimeoutError")
    with pytest.raises(UnsupportedRayError) as info:
        ray_compat.resolve_internals()
    assert isinstance(info.value, UserError) and isinstance(info.value, ImportError)
    check_message(str(info.value), "WorkerGroupStartupTimeoutError")


def test_a_module_missing_from_ray_fails_with_the_versions(monkeypatch):
    # A None entry in sys.modules makes the import fail, as for a module Ray no longer has.
    monkeypatch.setitem(sys.modules, ray_compat.INTERNALS["ControllerCallback"], None)
    with pytest.raises(UnsupportedRayError) as info:
        ray_compat.resolve_internals()
    check_message(str(info.value), ray_compat.INTERNALS["ControllerCallback"])


def test_the_wait_setting_is_the_variable_ray_train_reads():
    from ray.train.v2._internal.constants import WORKER_GROUP_START_TIMEOUT_S_ENV_VAR

    from pipelines.train_control import WORKER_GROUP_START_TIMEOUT_ENV

    assert WORKER_GROUP_START_TIMEOUT_ENV == WORKER_GROUP_START_TIMEOUT_S_ENV_VAR


def test_the_supported_range_is_the_one_pyproject_pins():
    text = (ROOT / "pyproject.toml").read_text()
    pins = re.search(r'"ray\[default,train,data\]>=([\d.]+),<([\d.]+)"', text)
    assert pins, "pyproject.toml pins no ray[default,train,data]>=A,<B"
    oldest, below = pins.groups()
    major, minor = ray_compat.NEWEST_RAY.split(".")
    assert (oldest, below) == (ray_compat.OLDEST_RAY, f"{major}.{int(minor) + 1}")


def test_a_private_method_missing_from_its_class_fails_with_the_versions(monkeypatch):
    # LeanTorchTrainer overrides the method where Ray Train lists a run's helper actors.
    owner = ray_compat.METHODS["_create_default_callbacks"]
    module, cls = owner.rsplit(".", 1)
    monkeypatch.delattr(getattr(importlib.import_module(module), cls), "_create_default_callbacks")
    with pytest.raises(UnsupportedRayError) as info:
        ray_compat.resolve_internals()
    check_message(str(info.value), "_create_default_callbacks")
