"""Strict validation of Kubernetes custom resources against a CRD's ``openAPIV3Schema``.

The API server drops (or, with strict field validation, rejects) fields a CRD does not declare, so
a typo in a manifest silently disables the setting. ``strict_validator`` turns such fields into
errors, as ``kubeconform -strict`` does: every object schema that declares ``properties`` and says
nothing about other keys gets ``additionalProperties: false``. Kubernetes' OpenAPI extensions are
translated to JSON Schema: ``x-kubernetes-int-or-string`` allows an integer or a string,
``nullable`` allows null, ``x-kubernetes-preserve-unknown-fields`` keeps an object open.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf")


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of an OpenAPI v3 (structural) schema that rejects undeclared fields."""
    out = copy.deepcopy(schema)
    _tighten(out)
    return out


def _tighten(node: dict[str, Any]) -> None:
    if node.get("x-kubernetes-int-or-string"):
        node.pop("type", None)
        node.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and isinstance(node.get("type"), str):
        node["type"] = [node["type"], "null"]
    open_object = node.get("x-kubernetes-preserve-unknown-fields") is True
    if "properties" in node and "additionalProperties" not in node and not open_object:
        node["additionalProperties"] = False
    for child in (node.get("properties") or {}).values():
        _tighten(child)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            _tighten(node[key])
    for key in SUBSCHEMA_LISTS:
        for child in node.get(key) or []:
            _tighten(child)


def crd_schema(crd_path: Path, version: str = "v1") -> dict[str, Any]:
    """The ``openAPIV3Schema`` of ``version`` in a CustomResourceDefinition file."""
    crd = yaml.safe_load(crd_path.read_text())
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise KeyError(f"{crd_path.name} has no version {version!r}")


def strict_validator(schema: dict[str, Any]) -> jsonschema.Draft7Validator:
    tightened = strict(schema)
    jsonschema.Draft7Validator.check_schema(tightened)
    return jsonschema.Draft7Validator(tightened)


def errors(validator: jsonschema.Draft7Validator, doc: Any) -> list[str]:
    """Every violation as 'path.to.field: message', sorted (empty when the document is valid)."""
    found = []
    for error in validator.iter_errors(doc):
        path = ".".join(str(p) for p in error.absolute_path) or "<root>"
        found.append(f"{path}: {error.message}")
    return sorted(found)
