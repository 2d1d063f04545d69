"""The pipeline's stages, in the order they run.

Each module here is one stage: its ``run`` function, the typed model of its manifest and one
``StageSpec`` (``pipelines.stage``) that the runner, the CLI and the job entry points read. To add
a stage, write its module and add its ``SPEC`` to ``STAGES`` below.
"""

from __future__ import annotations

from pipelines.errors import ConfigError
from pipelines.stage import StageSpec
from pipelines.stages import evaluate, sample, tokenize, train_prior, train_vqvae

STAGES: tuple[StageSpec, ...] = (
    train_vqvae.SPEC,
    tokenize.SPEC,
    train_prior.SPEC,
    sample.SPEC,
    evaluate.SPEC,
)


def stage_names() -> tuple[str, ...]:
    return tuple(spec.name for spec in STAGES)


def get_stage(name_or_verb: str) -> StageSpec:
    """A stage by its name (``train_vqvae``) or CLI verb (``train-vqvae``)."""
    for spec in STAGES:
        if name_or_verb in (spec.name, spec.verb):
            return spec
    raise ConfigError(f"unknown stage {name_or_verb!r}; expected one of {stage_names()}")
