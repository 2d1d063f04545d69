"""The pipeline's configuration schema: one YAML file, one section per stage.

This module is the single source of truth for every key a user can set. Unknown keys and bad
values are errors that name the key (``train_vqvae.steps: Input should be greater than 0``).
Model architecture keys are passed straight to the ``vq_core`` config dataclasses and validated
by them, so a model knob is documented in exactly one place. That validation imports the model
modules, and so torch: reading a config needs torch installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from pipelines.errors import ConfigError
from vq_core.kinds import DEFAULT_SAMPLING_METHOD, SAMPLING_METHODS, get_kind, kinds_of

# The kinds a config may name, from vq_core's table of model kinds.
AutoencoderKind = Literal[kinds_of("autoencoder")]  # type: ignore[valid-type]
PriorKind = Literal[kinds_of("prior")]  # type: ignore[valid-type]
SamplingMethod = Literal[SAMPLING_METHODS]  # type: ignore[valid-type]


def _absolute(uri: str) -> str:
    """Local paths become absolute, so manifests and Ray workers never depend on a working directory."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GenerateSection(Section):
    """A generated demo corpus of coloured shapes, one class per shape (see pipelines.data.demo_data)."""

    images_per_class: int = Field(200, gt=0)
    classes: list[str] = Field(default_factory=lambda: ["circle", "square", "triangle", "cross"])
    image_size: int = Field(64, ge=8)
    corrupt_files: int = Field(
        0, ge=0, description="Broken files added to exercise bad-input handling."
    )
    seed: int = 0
    background: Literal["gradient", "plain", "palette"] = Field(
        "gradient",
        description="Two-colour gradient backgrounds, one plain colour, or background and shape "
        "colours from a fixed palette of eight (easiest).",
    )


class AugmentSection(Section):
    enabled: bool = False
    crop_scale: float = Field(
        1.125,
        ge=1.0,
        le=2.0,
        description="Each training batch is resized to this factor of the image size, then every "
        "image is cropped back at a random offset (1 means no crop).",
    )
    flip: bool = Field(True, description="Mirror half of the training images left to right.")


class DataSection(Section):
    source: str = Field(
        ..., description="Path or URL of the corpus (folder, .tar shards or Parquet)."
    )
    format: Literal["auto", "folder", "webdataset", "parquet"] = "auto"
    image_size: int | tuple[int, int] = 64
    channels: Literal[1, 3] = 3
    validation_fraction: float = Field(
        0.05,
        ge=0.0,
        lt=1.0,
        description="Share of keys (by key hash) that picks checkpoints: the best prior and the "
        "training stages' held-out curves.",
    )
    test_fraction: float = Field(
        0.05,
        ge=0.0,
        lt=1.0,
        description="Share of keys (by key hash) behind the published figures (evaluate stage); "
        "never used to select anything.",
    )
    on_bad_input: Literal["skip", "fail"] = "skip"
    class_names: list[str] | None = Field(
        None,
        description="Names for integer labels (webdataset/parquet); a folder corpus uses its subfolders.",
    )
    labels: Literal["auto", "required", "none"] = Field(
        "auto",
        description="Whether the corpus has class labels. 'auto': a folder whose top level holds "
        "images (no class subfolders), WebDataset shards without any .cls member, or Parquet "
        "without data.label_column is unlabelled, anything else labelled; 'required': refuse a "
        "corpus without labels; 'none': ignore any labels. An unlabelled corpus gets "
        "unconditional priors, no rejection sampling and no CAS.",
    )
    image_column: str = "image"
    label_column: str = "label"
    key_column: str | None = None
    generate: GenerateSection | None = None
    cache: Literal["auto", "pixels", "encoded"] = Field(
        "auto",
        description="What the training image cache stores: decoded 'pixels' (fast to read, "
        "grows with the resolution), the 'encoded' image files (about the corpus' size, decoded "
        "while training reads them), or 'auto': pixels up to 64x64 images, encoded above.",
    )
    augment: AugmentSection = Field(
        default_factory=AugmentSection,
        description="Random crops and flips of the autoencoder's training images (train split "
        "only; never tokenize, evaluation or the held-out splits).",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed_holdout_fraction(cls, data: Any) -> Any:
        if isinstance(data, dict) and "holdout_fraction" in data:
            raise ValueError(
                f"data.holdout_fraction (got {data['holdout_fraction']!r}) was replaced by two "
                "keys: data.validation_fraction (selects checkpoints) and data.test_fraction (the "
                "published figures); set those instead"
            )
        return data

    @model_validator(mode="after")
    def _class_names_need_labels(self) -> DataSection:
        if self.class_names is not None and not self.class_names:
            raise ValueError("data.class_names is an empty list; leave it unset")
        if self.class_names is not None and self.labels == "none":
            raise ValueError(
                f"data.class_names {self.class_names} names classes, but data.labels is 'none' "
                "(the labels are ignored); remove one of them"
            )
        return self

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> DataSection:
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"data.validation_fraction ({self.validation_fraction}) + data.test_fraction "
                f"({self.test_fraction}) must be below 1, or nothing is left to train on"
            )
        return self

    @field_validator("source")
    @classmethod
    def _absolute_source(cls, v: str) -> str:
        return _absolute(v)

    @field_validator("image_size")
    @classmethod
    def _divisible_by_8(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        for side in (v,) if isinstance(v, int) else v:
            if side <= 0 or side % 8:
                raise ValueError(f"image sides must be positive multiples of 8, got {side}")
        return v

    @property
    def size_hw(self) -> tuple[int, int]:
        return (
            (self.image_size, self.image_size)
            if isinstance(self.image_size, int)
            else tuple(self.image_size)
        )


def _validate_model_section(kind: str, params: dict[str, Any], where: str) -> None:
    """Check a ``model:`` section against the vq_core config dataclass of ``kind``."""
    model_kind = get_kind(kind)
    model_kind.check_user_fields(params, where)
    try:  # the dataclass validates values and names the field it rejects
        model_kind.config_class(**params)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None


class TrainingKnobs(Section):
    steps: int = Field(1000, gt=0)
    batch_size: int = Field(32, gt=0, description="Per worker.")
    lr: float = Field(3e-4, gt=0)
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks).")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    accumulate_steps: int = Field(
        1,
        ge=1,
        description="Micro-batches of batch_size whose gradients make one optimizer step: the "
        "effective batch per worker is batch_size x accumulate_steps, in the memory of one "
        "batch_size. steps, the learning rate, logging and checkpoints count optimizer steps.",
    )
    activation_checkpointing: bool = Field(
        False,
        description="Recompute the model's blocks' activations in the backward pass instead of "
        "keeping them: much less memory per sample for about a third more compute.",
    )
    log_every: int = Field(20, gt=0)
    eval_every: int = Field(200, gt=0)
    checkpoint_every: int = Field(200, gt=0)
    max_failures: int = Field(2, ge=0)
    holdout_batches: int = Field(
        4, gt=0, description="Validation batches per evaluation (a fixed key-hash subset)."
    )
    shuffle_buffer: int = Field(
        2048,
        gt=0,
        description="Rows in the local shuffle buffer that mixes what each worker reads (after "
        "the per-epoch permutation of files, row groups or shards).",
    )
    torch_threads: int | None = Field(
        None,
        gt=0,
        description="Torch threads per training worker. Default: with a local Ray, the machine's "
        "CPUs divided among the workers; on a cluster, cpus_per_worker.",
    )
    early_stopping: int = Field(
        0,
        ge=0,
        description="Stop training once this many evaluations in a row (every eval_every steps, "
        "on the validation split) have not beaten the best validation score; 0 trains for all "
        "steps. For stages that select their weights on validation (train_prior).",
    )
    fail_at_step: int | None = Field(
        None,
        gt=0,
        description=(
            "Fault injection for resume tests: the first attempt raises right after step N (put N "
            "on a checkpoint to test resuming). Leave unset."
        ),
    )


class TrainVQVAESection(TrainingKnobs):
    kind: AutoencoderKind = "vqvae2"
    model: dict[str, Any] = Field(
        default_factory=dict, description="Fields of the vq_core model config."
    )
    grid_images: int = Field(16, gt=0, description="Validation images in the reconstruction grid.")
    temperature_end: float = Field(
        1.0 / 16,
        gt=0,
        description="dVAE only: Gumbel-softmax temperature reached at the end of the annealing "
        "(it starts at model.temperature).",
    )
    temperature_anneal_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="dVAE only: fraction of the steps over which the Gumbel-softmax temperature "
        "anneals from model.temperature to temperature_end (the paper's is 0.05 of 3 million "
        "steps; over the whole of a short run measured better).",
    )
    kl_warmup_fraction: float = Field(
        0.1,
        ge=0,
        le=1,
        description="dVAE only: fraction of the steps over which the KL weight ramps up from 0 to "
        "model.kl_weight.",
    )
    temperature_anneal_steps: int | None = Field(
        None,
        gt=0,
        description="dVAE only: steps of temperature annealing, in place of "
        "temperature_anneal_fraction.",
    )
    kl_warmup_steps: int | None = Field(
        None,
        ge=0,
        description="dVAE only: steps of the KL weight's ramp, in place of kl_warmup_fraction.",
    )

    @model_validator(mode="after")
    def _check_model(self) -> TrainVQVAESection:
        _validate_model_section(self.kind, self.model, "train_vqvae.model")
        if self.kind != "dvae":
            for name in (
                "temperature_anneal_steps",
                "kl_warmup_steps",
                "temperature_anneal_fraction",
                "kl_warmup_fraction",
            ):
                # A value other than the default: a resolved config, dumped and read back,
                # carries the defaults of every key.
                if getattr(self, name) != type(self).model_fields[name].default:
                    raise ValueError(
                        f"train_vqvae.{name} only applies to kind 'dvae', got kind {self.kind!r}"
                    )
        if self.early_stopping:
            raise ValueError(
                f"train_vqvae.early_stopping (got {self.early_stopping}) is not supported: the "
                "autoencoder keeps its final weights; early stopping applies to train_prior"
            )
        return self


class PriorSection(TrainingKnobs):
    kind: PriorKind = "pixelsnail"
    model: dict[str, Any] = Field(
        default_factory=dict, description="Fields of the vq_core prior config."
    )


def _default_prior(conditioned: bool) -> PriorSection:
    """The section of a level configured nowhere: PriorSection's defaults, as for_level fills in."""
    return _with_level_defaults(PriorSection(), conditioned)


def _with_level_defaults(section: PriorSection, conditioned: bool) -> PriorSection:
    """``section`` with the defaults that depend on where its level sits: a PixelSNAIL prior below
    the top (conditioned on the level above) has no attention unless model.attention says so."""
    if conditioned and section.kind == "pixelsnail" and "attention" not in section.model:
        # The paper's bottom prior relies on the codes above for global structure: no attention.
        return section.model_copy(update={"model": {**section.model, "attention": False}})
    return section


def _level_section(value: Any) -> Any:
    """A level's section is a mapping: any other value under train_prior is a key it lacks (a
    training knob one level too high, say), reported as the unknown key it is."""
    if isinstance(value, (dict, PriorSection)):
        return value
    raise PydanticCustomError("extra_forbidden", "Extra inputs are not permitted")


# What train_prior holds under a level's name.
LevelSection = Annotated[PriorSection, BeforeValidator(_level_section)]


class TrainPriorSection(Section):
    """One prior per code level, in a section named after the level: ``train_prior.<level>``.

    The levels are the autoencoder's (``train_vqvae.kind``'s, or those ``train_vqvae.model.levels``
    names; a pinned tokenizer's are its checkpoint's): ``top`` and ``bottom`` for the default
    VQ-VAE-2, ``codes`` for a one-level VQ-VAE or dVAE. A level without a section gets the
    ``PriorSection`` defaults; a PixelSNAIL prior below the top level has no attention unless
    ``model.attention`` says so, as in the paper. A section for a level the autoencoder does not
    have is refused. Read a level's section with ``for_level``."""

    # Every key besides shards is a level's section.
    model_config = ConfigDict(extra="allow", validate_assignment=True)
    __pydantic_extra__: dict[str, LevelSection] = Field(init=False)

    shards: list[str] | None = Field(
        None,
        description="Code datasets to train on together: tokenize stage folders, output_dirs "
        "holding one, or their manifest.json files, all made with the same tokenizer. Keys are "
        "prefixed with each corpus' tokenize.corpus_name; classes are merged by name. Default: "
        "this run's tokenize (list this output_dir to include it with others).",
    )

    @field_validator("shards")
    @classmethod
    def _absolute_shards(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        if not v:
            raise ValueError("train_prior.shards is an empty list; leave it unset for this run's")
        return [_absolute(s) for s in v]

    @model_validator(mode="after")
    def _check_models(self) -> TrainPriorSection:
        for level, section in self.sections().items():
            get_kind(section.kind).check_user_fields(section.model, f"train_prior.{level}.model")
        return self

    def sections(self) -> dict[str, PriorSection]:
        """The level sections present, by level name: those configured, or once the
        configuration knows its autoencoder's levels, one per level, top first."""
        return dict(self.__pydantic_extra__ or {})

    def for_level(
        self, level: str, levels: list[str] | tuple[str, ...] | None = None
    ) -> PriorSection:
        """The section of the prior over ``level``, one of the autoencoder's ``levels`` (top
        first; default: the levels with a section), with the defaults of its place: the
        configured section or PriorSection's defaults, without attention for a PixelSNAIL below
        the top unless its model.attention says so."""
        sections = self.sections()
        levels = list(sections if levels is None else levels)
        if level not in levels:
            raise ConfigError(
                f"no train_prior section for code level {level!r}; the code levels are {levels}"
            )
        section = sections.get(level, PriorSection())
        return _with_level_defaults(section, conditioned=levels.index(level) > 0)

    def check_levels(self, levels: list[str] | tuple[str, ...], source: str) -> None:
        """Raise ConfigError when a section configures a level not in ``levels``, the levels
        that ``source`` ("train_vqvae.kind 'dvae'", "the code shards") has. A section left at
        the defaults is no mistake: a resolved config, dumped and read back, lists the level
        sections of the defaults, as older versions did for every level they knew."""
        stray = [
            level
            for level, section in self.sections().items()
            if level not in levels and section not in (_default_prior(False), _default_prior(True))
        ]
        if stray:
            wanted = [f"train_prior.{level}" for level in levels]
            raise ConfigError(
                f"train_prior.{stray[0]} configures a prior for code level {stray[0]!r}, but "
                f"{source} has levels {list(levels)}; configure "
                f"{' and '.join([', '.join(wanted[:-1]), wanted[-1]] if wanted[:-1] else wanted)} "
                "instead"
            )

    def resolve_levels(self, levels: list[str] | tuple[str, ...], source: str) -> None:
        """Check the sections against the autoencoder's ``levels`` (``check_levels``), then hold
        exactly one section per level, top first, each with the defaults of its place, so that
        ``vqpipe validate`` shows and the fingerprints cover what each prior is trained with."""
        self.check_levels(levels, source)
        if "shards" in levels:
            raise ConfigError(
                f"{source} has a code level named 'shards', which is train_prior's key for the "
                "code datasets, not a level section; rename the level"
            )
        self.__pydantic_extra__ = {level: self.for_level(level, levels) for level in levels}


class TokenizeSection(Section):
    checkpoint: str = Field(
        "",
        description="The autoencoder to encode with: a vq_core checkpoint path or URL, or a "
        "registered model models:/<name>/<version or @alias> (looked up on mlflow.tracking_uri, "
        "else MLFLOW_TRACKING_URI). Empty: the one train_vqvae trains in this output_dir. When "
        "set, train_vqvae is not needed and `vqpipe run` leaves it out.",
    )
    corpus_name: str | None = Field(
        None,
        description="Name of this corpus in a union of code datasets (train_prior.shards); its "
        "keys are prefixed with it there. Default: the last folder name of data.source.",
    )
    batch_size: int = Field(64, gt=0, description="Images per encoder call.")
    num_actors: int = Field(1, ge=1, description="Encoder actors (model replicas).")
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    shard_max_samples: int = Field(1000, gt=0)
    interleave: int = Field(
        16,
        ge=1,
        description="WebDataset and Parquet corpora: shards or row groups read together, their "
        "samples alternating, so that a corpus stored one class per file still gives class-mixed "
        "code shards (a folder corpus is read image by image in key-hash order and needs none). "
        "Memory holds a few samples per file of a group.",
    )

    @field_validator("checkpoint")
    @classmethod
    def _absolute_checkpoint(cls, v: str) -> str:
        v = v.strip()
        return v if not v or v.startswith("models:/") else _absolute(v)

    @field_validator("corpus_name")
    @classmethod
    def _plain_corpus_name(cls, v: str | None) -> str | None:
        if v is not None and (not v or v in (".", "..") or "/" in v or "\\" in v):
            raise ValueError(f"a corpus name must be a non-empty name without '/', got {v!r}")
        return v


class RejectionSection(Section):
    enabled: bool = False
    keep_fraction: float = Field(0.5, gt=0, le=1.0)
    classifier_steps: int = Field(300, gt=0)
    classifier_lr: float = Field(1e-3, gt=0, description="Adam learning rate of the classifier.")
    max_images: int = Field(
        4096,
        gt=0,
        description="Most real train images the classifier sees (a deterministic key-hash subset).",
    )


class LevelSampling(Section):
    """How one level's codes are drawn, where it differs from the sample section's settings: a
    key left unset (None) takes the stage's ``temperature``, ``top_k``, ``top_p`` or
    ``guidance``. To turn the stage's top_k or top_p off at one level, give that level
    ``top_p: 1.0`` or a ``top_k`` of at least the level's codebook size, and ``guidance: 1.0``
    to draw it without guidance."""

    temperature: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1.0)
    guidance: float | None = Field(None, ge=0, allow_inf_nan=False)


# What a level's draw is set by: the sample section's keys that sample.levels may override.
LEVEL_SETTINGS = ("temperature", "top_k", "top_p", "guidance")


class SampleSection(Section):
    classes: list[str] | None = Field(
        None,
        description="Class names to sample; all when unset (must be unset for an "
        "unlabelled corpus).",
    )
    per_class: int = Field(
        16,
        gt=0,
        description="Images drawn per class; for an unlabelled corpus (unconditional priors), the "
        "number of images drawn.",
    )
    batch_size: int = Field(16, gt=0)
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1.0)
    guidance: float = Field(
        1.0,
        ge=0,
        allow_inf_nan=False,
        description="Classifier-free guidance scale: each step draws from u + guidance * (c - u) "
        "over the unconditional (u) and class-conditional (c) logits. 1 is the plain "
        "class-conditional draw; above 1 needs priors trained with "
        "train_prior.<level>.model.label_dropout > 0, and costs two passes per step.",
    )
    method: SamplingMethod = DEFAULT_SAMPLING_METHOD
    seed: int = 0
    cpus_per_worker: float = Field(
        1.0, gt=0, description="CPUs reserved by each sampling actor (fractions allowed)."
    )
    grid_images: int = Field(64, gt=0, description="Samples per class shown in its grid.")
    rejection: RejectionSection = Field(default_factory=RejectionSection)
    levels: dict[str, LevelSampling] = Field(
        default_factory=dict,
        description="Per code level (by name), sampling settings that replace the stage's "
        "temperature, top_k, top_p and guidance for that level's prior, e.g. "
        "{bottom: {temperature: 0.9}}. Levels not listed, and keys not set, use the stage's.",
    )

    def for_level(self, level: str) -> dict[str, Any]:
        """The temperature, top_k, top_p and guidance that ``level``'s codes are drawn with."""
        own = self.levels.get(level, LevelSampling())
        return {
            key: getattr(self, key) if getattr(own, key) is None else getattr(own, key)
            for key in LEVEL_SETTINGS
        }

    def check_levels(self, levels: list[str] | tuple[str, ...], source: str) -> None:
        """Raise ConfigError when sample.levels names a level not in ``levels`` (``source``'s)."""
        unknown = [level for level in self.levels if level not in levels]
        if unknown:
            raise ConfigError(
                f"sample.levels.{unknown[0]} sets the sampling of code level {unknown[0]!r}, but "
                f"{source} has levels {list(levels)}"
            )


class EvaluateSection(Section):
    enabled: bool = True
    holdout_batches: int = Field(
        8,
        gt=0,
        description="Test-split batches for the reconstruction error and the priors' bits per code "
        "(codebook usage and perplexity always cover every test code).",
    )
    batch_size: int = Field(32, gt=0)
    classifier_steps: int = Field(
        300,
        gt=0,
        description="Training steps of each classifier: CAS on samples, its size-matched real "
        "reference, and the judge.",
    )
    classifier_lr: float = Field(1e-3, gt=0)
    max_images: int = Field(
        4096,
        gt=0,
        description="Most real images per split (train: the judge's data and the pool of the "
        "size-matched reference; test: scoring) (a deterministic key-hash subset).",
    )
    seeds: int = Field(
        1,
        ge=1,
        description="Sampling seeds to repeat CAS and the feature-space figures over: the "
        "sample stage's images, then seeds sample.seed + 1, ... drawn here. Reports mean, std, "
        "min and max over seeds.",
    )
    bootstrap_samples: int = Field(
        1000, ge=100, description="Resamples of the test images behind each 95% interval."
    )
    neighbours: int = Field(
        3, ge=1, description="k of the k-nearest-neighbour manifolds of precision and recall."
    )
    grid_images: int = Field(8, gt=0, description="Test images in the reconstruction grid.")


class RaySection(Section):
    address: str | None = Field(
        None, description="None starts a local Ray in-process; 'auto' joins a cluster."
    )
    num_cpus: int | None = Field(None, gt=0)
    object_store_memory: int | None = Field(None, gt=0)
    resource_wait_seconds: float = Field(
        300.0,
        gt=0,
        description="Longest wait for the cluster to place all workers of a training stage, at "
        "its start and after a lost worker; then the stage fails naming what it asked for.",
    )


class RegisteredModelsSection(Section):
    """Names under which the trained models are registered in MLflow's model registry."""

    autoencoder: str | None = Field(
        None, description="The autoencoder, as a tokenizer (images in, codes out)."
    )
    prior: str | None = Field(
        None, description="Prefix of the priors' names: each registers as <prior>-<level>."
    )


class MLflowSection(Section):
    tracking_uri: str | None = Field(None, description="Default: sqlite:///<output_dir>/mlflow.db.")
    experiment: str = "vqpipe"
    run_name: str | None = None
    log_models: bool = Field(
        True,
        description="Log the autoencoder and the priors as MLflow models (pyfunc, defined from "
        "code; the artifact is the vq_core checkpoint).",
    )
    registered_models: RegisteredModelsSection = Field(default_factory=RegisteredModelsSection)


class PipelineConfig(Section):
    output_dir: str
    seed: int = 0
    data: DataSection
    ray: RaySection = Field(default_factory=RaySection)
    mlflow: MLflowSection = Field(default_factory=MLflowSection)
    train_vqvae: TrainVQVAESection = Field(default_factory=TrainVQVAESection)
    tokenize: TokenizeSection = Field(default_factory=TokenizeSection)
    train_prior: TrainPriorSection = Field(default_factory=TrainPriorSection)
    sample: SampleSection = Field(default_factory=SampleSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)

    @model_validator(mode="after")
    def _prior_sections_match_the_levels(self) -> PipelineConfig:
        levels = self.code_levels()
        if levels is None:
            return self  # a pinned tokenizer's levels are known once its checkpoint is read
        source = f"train_vqvae.kind {self.train_vqvae.kind!r}"
        if "levels" in self.train_vqvae.model:
            source = "train_vqvae.model.levels"
        self.train_prior.resolve_levels(levels, source)
        self.sample.check_levels(levels, source)
        return self

    @model_validator(mode="after")
    def _rejection_needs_labels(self) -> PipelineConfig:
        if self.data.labels == "none" and self.sample.rejection.enabled:
            raise ValueError(rejection_needs_labels("data.labels is 'none'"))
        if self.data.labels == "none" and self.sample.classes is not None:
            raise ValueError(
                f"sample.classes is {self.sample.classes}, but data.labels is 'none': the priors "
                "are unconditional; leave sample.classes unset"
            )
        return self

    def code_levels(self) -> tuple[str, ...] | None:
        """The autoencoder's code levels, top first, as far as the configuration knows them:
        ``train_vqvae.kind``'s (or those ``train_vqvae.model.levels`` names); None with a pinned
        tokenizer (``tokenize.checkpoint``), whose levels are in its checkpoint."""
        if self.tokenize.checkpoint:
            return None
        return get_kind(self.train_vqvae.kind).levels_for(self.train_vqvae.model)

    @field_validator("output_dir")
    @classmethod
    def _absolute_output_dir(cls, v: str) -> str:
        return _absolute(v)


def rejection_needs_labels(why: str) -> str:
    """The error of sample.rejection.enabled on a corpus without labels (``why`` says how that
    is known)."""
    return (
        f"sample.rejection.enabled is true, but {why}: rejection sampling scores draws with a "
        "classifier trained on the corpus' class labels; set sample.rejection.enabled to false"
    )


# Keys added to a section after runs were fingerprinted with it. At their default they are left
# out of every fingerprint of the section, so that adding them redoes no finished stage; any other
# value is part of it.
FINGERPRINT_NEUTRAL_DEFAULTS: dict[str, dict[str, Any]] = {"data": {"labels": "auto"}}


def without_neutral_defaults(section: str, dumped: Any) -> Any:
    """A section's JSON dump (``model_dump(mode="json")``) without the keys that
    ``FINGERPRINT_NEUTRAL_DEFAULTS`` lists at their default: what fingerprints hash."""
    neutral = FINGERPRINT_NEUTRAL_DEFAULTS.get(section)
    if not neutral or not isinstance(dumped, dict):
        return dumped
    return {k: v for k, v in dumped.items() if k not in neutral or v != neutral[k]}


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif "input" in e and e["type"] not in ("missing",) and e["loc"]:
            # Not for a check of the whole configuration, whose input is all of it.
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"  {where}: {msg}")
    return "invalid configuration:\n" + "\n".join(lines)


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``key.sub=value`` override; the value is parsed as YAML (``3``, ``true``, ``[a, b]``)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key.sub=value")
    dotted, value = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {assignment!r} has an empty key")
    node = raw
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: {k} is not a section")
        node = child
    node[keys[-1]] = yaml.safe_load(value)


def parse_config(
    raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()
) -> PipelineConfig:
    if not isinstance(raw, dict):
        raise ConfigError(
            f"a configuration must be a mapping of sections, got {type(raw).__name__}"
        )
    raw = json.loads(json.dumps(raw))  # deep copy; YAML scalars only
    for assignment in overrides:
        apply_override(raw, assignment)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_config(raw or {}, overrides)
