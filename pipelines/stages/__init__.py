"""The pipeline's stages, in the order they run.

Each module here is one stage: its ``run`` function, the typed model of its manifest and one
``StageSpec`` (``pipelines.stage``) that the runner, the CLI and the job entry points read. To add
a stage, write its module and add its name to ``STAGE_MODULES`` below.

The stage modules are imported when ``STAGES`` is first read, not when this package is: a Ray
Train worker or Ray Data actor unpickles a function of one stage module, which imports this
package first, and it should not pay for the imports of every other stage (the report's plotting
library, among others) before its first step.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from pipelines.errors import ConfigError

if TYPE_CHECKING:
    from pipelines.stage import StageSpec

# The stages in the order they run; each module's ``SPEC`` describes it.
STAGE_MODULES = ("train_vqvae", "tokenize", "train_prior", "sample", "evaluate")

STAGES: tuple[StageSpec, ...]


def __getattr__(name: str):
    if name == "STAGES":
        specs = tuple(
            importlib.import_module(f"{__name__}.{module}").SPEC for module in STAGE_MODULES
        )
        globals()["STAGES"] = specs
        return specs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def stage_names() -> tuple[str, ...]:
    return STAGE_MODULES


def get_stage(name_or_verb: str) -> StageSpec:
    """A stage by its name (``train_vqvae``) or CLI verb (``train-vqvae``)."""
    for spec in __getattr__("STAGES"):
        if name_or_verb in (spec.name, spec.verb):
            return spec
    raise ConfigError(f"unknown stage {name_or_verb!r}; expected one of {stage_names()}")
