"""How a stage is declared, what it receives, and the Ray session the stages share.

A stage is one module under ``pipelines/stages`` holding its ``run`` function, the typed model of
its manifest and one ``StageSpec``: everything the runner, the CLI and the job entry points need
to know about it. Adding a stage means one new module and one line in ``pipelines.stages``.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pipelines.config import PipelineConfig
from pipelines.manifest import StageManifest, cli_verb

if TYPE_CHECKING:
    from pipelines.sizing import MemoryProbe
    from pipelines.tracking import TrackingContext

log = logging.getLogger("vqpipe")

# Where and how a stage runs, not what it computes: every stage may read these, and they are in no
# fingerprint (moving output_dir is another run; a new Ray address or MLflow server is not).
INFRASTRUCTURE = frozenset({"output_dir", "ray", "mlflow"})


# What a change in the corpus listing (images added, removed or touched) does to a stage that
# reads the images; see StageSpec.on_corpus_change.
CorpusChange = Literal["redo", "keep", "incremental"]
CORPUS_CHANGES: tuple[str, ...] = ("redo", "keep", "incremental")


def _always(cfg: PipelineConfig) -> bool:
    return True


@dataclass(frozen=True)
class StageSpec:
    """One stage, declared once.

    ``manifest`` is the stage's manifest model; its ``stage`` attribute is the stage's name, the
    name of its folder and of its config section. ``upstream`` are the manifests the stage reads
    (a redone upstream stage makes it stale), all it may read; ``upstream_for`` narrows them for a
    given config (a tokenize stage with a pinned checkpoint reads no train_vqvae manifest);
    ``external_inputs`` reads and checks the inputs that live outside ``output_dir`` (a pinned
    checkpoint, other runs' code shards) and returns a hash per input for the stage's fingerprint;
    it raises a UserError for an unusable input, and the runner calls it before writing anything.
    ``sections`` the config sections it reads besides its
    own; ``reads_corpus`` whether it reads the images; ``enabled`` lets a config turn the stage
    off. The manifest's ``summary()`` is the CLI's one line about the finished stage.

    ``cli_options`` adds the stage's own options to its command (``vqpipe <verb>``), beside
    CONFIG, ``--set`` and ``--force``; ``config_from_args`` turns the parsed command line into
    the configuration, or returns None to have CONFIG loaded with ``--set`` as for any stage. A
    stage that declares ``config_from_args`` may be run without a CONFIG file.
    ``memory_probes`` (training stages) gives the models and batches its workers train, for
    the memory estimate ``vqpipe validate`` prints and the stage checks before it trains.
    ``check_inputs`` checks the upstream files the stage will read that can change after their
    stage wrote them (code shards, a tokenizer checkpoint); the runner calls it once the stage
    is to run, before it clears the stage's last outputs, so a damaged input costs nothing.

    ``on_corpus_change`` says what a changed corpus listing (``data.source`` gained, lost or
    touched files) means for a stage that reads the corpus:

    - ``"redo"``: the listing is part of the stage's identity; the stage directory is cleared and
      the stage runs from scratch (evaluate: its metrics describe one corpus).
    - ``"keep"``: the listing is ignored; the stage stays up to date while its config and
      upstream are unchanged (train_vqvae: an autoencoder trained on yesterday's images still
      encodes today's; ``--force`` or a changed config retrains it).
    - ``"incremental"``: the listing is not part of the stage's identity, but a changed listing
      makes its manifest stale. The runner then keeps the stage directory, finished work
      included, and runs the stage again, which must bring that work up to date with the new
      listing (tokenize: encodes only new images, records removed ones). Its manifest carries a
      fingerprint of identity and listing together, so downstream stages follow the change.
    """

    manifest: type[StageManifest]
    run: Callable[[StageContext], StageManifest]
    description: str
    upstream: tuple[type[StageManifest], ...] = ()
    sections: tuple[str, ...] = ()
    reads_corpus: bool = False
    on_corpus_change: CorpusChange = "redo"
    enabled: Callable[[PipelineConfig], bool] = field(default=_always)
    upstream_for: Callable[[PipelineConfig], tuple[type[StageManifest], ...]] | None = None
    external_inputs: Callable[[PipelineConfig], dict[str, str]] | None = None
    cli_options: Callable[[argparse.ArgumentParser], None] | None = None
    config_from_args: Callable[[argparse.Namespace], PipelineConfig | None] | None = None
    memory_probes: Callable[[PipelineConfig], list[MemoryProbe]] | None = None
    check_inputs: Callable[[PipelineConfig], None] | None = None

    def __post_init__(self) -> None:
        if self.on_corpus_change not in CORPUS_CHANGES:
            raise ValueError(
                f"stage {self.name!r}: on_corpus_change must be one of {CORPUS_CHANGES}, "
                f"got {self.on_corpus_change!r}"
            )

    @property
    def listing_in_identity(self) -> bool:
        """Whether a changed corpus listing clears the stage directory and redoes the stage."""
        return self.reads_corpus and self.on_corpus_change == "redo"

    @property
    def listing_in_manifest(self) -> bool:
        """Whether a changed corpus listing makes the stage's manifest stale."""
        return self.reads_corpus and self.on_corpus_change != "keep"

    @property
    def name(self) -> str:
        return self.manifest.stage

    @property
    def verb(self) -> str:
        return cli_verb(self.name)

    @property
    def reads(self) -> tuple[str, ...]:
        """Every config section the stage's outputs depend on (its fingerprint's sections)."""
        return (*self.sections, self.name)

    @property
    def upstream_names(self) -> tuple[str, ...]:
        return tuple(m.stage for m in self.upstream)

    def upstream_of(self, cfg: PipelineConfig) -> tuple[type[StageManifest], ...]:
        """The upstream manifests the stage reads under ``cfg``."""
        return self.upstream_for(cfg) if self.upstream_for is not None else self.upstream

    def external_of(self, cfg: PipelineConfig) -> dict[str, str]:
        """A hash per input outside ``output_dir`` (empty when there are none)."""
        return self.external_inputs(cfg) if self.external_inputs is not None else {}


class ConfigView:
    """The configuration as one stage sees it: the sections its declaration lists, and the
    infrastructure settings. Reading any other section raises, so a stage cannot depend on a
    setting that its fingerprint ignores; ``read`` records what the stage used."""

    def __init__(self, cfg: PipelineConfig, stage: str, sections: tuple[str, ...]):
        object.__setattr__(self, "_cfg", cfg)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_allowed", frozenset(sections) | INFRASTRUCTURE)
        object.__setattr__(self, "read", set())

    def __getattr__(self, name: str) -> Any:
        cfg = object.__getattribute__(self, "_cfg")
        if name in type(cfg).model_fields:
            if name not in self._allowed:
                raise RuntimeError(
                    f"stage {self._stage!r} read config section {name!r}, which its StageSpec "
                    f"does not declare (declared: {sorted(self._allowed - INFRASTRUCTURE)}); "
                    "declare it so that its fingerprint follows the setting"
                )
            if name not in INFRASTRUCTURE:
                self.read.add(name)
        return getattr(cfg, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a stage's configuration is read-only")


@dataclass(frozen=True)
class StageContext:
    """A stage's inputs besides the config.

    ``stage_dir`` is where the stage writes (``<output_dir>/<stage>``); ``fingerprint`` identifies the
    stage's config and upstream outputs, so partial work left by an interrupted run with the same
    fingerprint can be resumed (Ray Train run names, finished shards); for an incremental stage it
    leaves the corpus listing out, since its finished work stays valid when the corpus changes.
    ``tracking`` logs to the stage's MLflow child run.
    """

    cfg: PipelineConfig | ConfigView
    stage: str
    stage_dir: str
    fingerprint: str
    tracking: TrackingContext


def ensure_ray(cfg: PipelineConfig) -> None:
    """Join the configured cluster, or start a local Ray in this process sized to the machine."""
    import ray

    from pipelines import console, interrupts, logs

    if ray.is_initialized():
        logs.attach_ray()
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        # `ray job submit` sets RAY_ADDRESS for the driver; the cluster's size is its own.
        log.info("joining Ray cluster at %s", address)
        ray.init(address=cfg.ray.address, **logs.ray_init_options())
        logs.attach_ray()
        interrupts.reclaim()  # from ray.init's SIGTERM handlers
        return
    num_cpus = cfg.ray.num_cpus or os.cpu_count() or 1
    log.info("starting a local Ray with %d CPUs", num_cpus)
    # The dashboard also serves the State API, which Ray Train's controller polls; without it
    # every training run floods the log with warnings.
    context = ray.init(
        num_cpus=num_cpus,
        object_store_memory=cfg.ray.object_store_memory,
        **logs.ray_init_options(),
    )
    logs.attach_ray()
    interrupts.reclaim()  # from ray.init's SIGTERM handlers
    if context.dashboard_url:
        log.info("Ray dashboard: http://%s", context.dashboard_url)
        console.current().line(f"Ray dashboard: http://{context.dashboard_url}")
