"""What each stage writes: the typed model of every stage's ``manifest.json``.

They live here, below the stages, because a stage reads the manifests of the stages upstream of it
(sample reads the priors', evaluate reads them all) and a stage never imports another stage. Each
``StageSpec`` names its stage's model; ``pipelines.manifest`` holds what they share (fingerprints,
reading and writing, format versions).

The models follow the pipeline's order: train_vqvae, tokenize, train_prior, sample, evaluate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pipelines.data.shards import CodeShards
from pipelines.manifest import ManifestModel, StageManifest, format_metrics
from pipelines.tokenizer import TokenizerIdentity

if TYPE_CHECKING:
    from torch import nn

# How many bad inputs a tokenize manifest names (all of them are in its bad-inputs table).
BAD_KEYS_IN_MANIFEST = 100


class TrainVQVAEManifest(StageManifest):
    """The trained autoencoder and what later stages need to know about its codes."""

    stage: ClassVar[str] = "train_vqvae"

    checkpoint: str
    model: str  # the model kind (train_vqvae.kind)
    levels: list[str]  # coarsest first: ["top", "bottom"] by default, ["codes"] for one level
    codebook_sizes: dict[str, int]
    code_shapes: dict[str, list[int]]  # level -> [h, w]
    image_size: list[int]  # [H, W]
    channels: int
    class_names: list[str]
    steps: int
    metrics: dict[str, float]
    artifacts: dict[str, str]
    registered_model: str | None = None  # models:/<name>/<version>, when registered

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        *,
        checkpoint: str,
        kind: str,
        image_size: tuple[int, int] | list[int],
        channels: int,
        class_names: list[str],
        steps: int = 0,
        metrics: dict[str, float] | None = None,
        artifacts: dict[str, str] | None = None,
        registered_model: str | None = None,
    ) -> TrainVQVAEManifest:
        """The manifest of ``model`` saved at ``checkpoint``: levels and code shapes from the model."""
        height, width = image_size
        shapes = model.code_shape(height, width)
        return cls(
            checkpoint=checkpoint,
            model=kind,
            levels=list(model.levels),
            codebook_sizes=dict(zip(model.levels, model.codebook_sizes)),
            code_shapes={level: list(shape) for level, shape in zip(model.levels, shapes)},
            image_size=[height, width],
            channels=channels,
            class_names=class_names,
            steps=steps,
            metrics=metrics or {},
            artifacts=artifacts or {},
            registered_model=registered_model,
        )

    def summary(self) -> str:
        shown = ["validation/mse"] + [f"validation/perplexity/{level}" for level in self.levels]
        return format_metrics(self.metrics, shown)


class BadInputs(ManifestModel):
    count: int
    keys: list[str]  # the first BAD_KEYS_IN_MANIFEST, in key order
    table: str  # Parquet table of every bad input: key, source, reason


class TokenizeManifest(StageManifest, CodeShards):
    """The code shards of the corpus (``CodeShards``: the shards and how to read them) and what
    they were made from. An unlabelled corpus has no ``class_names`` and ``labelled`` false."""

    stage: ClassVar[str] = "tokenize"

    samples: int
    splits: dict[str, int]
    codebook_sizes: dict[str, int]
    class_names: list[str]
    checkpoint: str
    tokenizer: TokenizerIdentity
    corpus_name: str
    image_size: list[int]
    channels: int
    bad_inputs: BadInputs
    metrics: dict[str, float]
    removed: int = 0  # samples whose image left the corpus; listed in removed_table
    wids_index: str = ""  # codes.wids.json beside the shards

    def summary(self) -> str:
        removed = f", {self.removed} removed" if self.removed else ""
        unlabelled = "" if self.labelled else ", unlabelled"
        maps = ", ".join(
            f"{level} {'x'.join(str(n) for n in self.code_shapes[level])}" for level in self.levels
        )
        return (
            f"{self.samples} samples in {len(self.shards)} shards{removed}{unlabelled}, "
            f"{self.bad_inputs.count} bad inputs; code maps {maps}"
        )


class CorpusCodes(ManifestModel):
    """One member of a union: its corpus name, its tokenize manifest, its live samples, and the
    merged label of each of its own labels (its class i is merged class ``labels[i]``)."""

    name: str
    manifest: str
    samples: int
    labels: list[int]


class PriorEntry(ManifestModel):
    checkpoint: str
    kind: str
    condition: str | None  # the level directly above, which this prior reads (None at the top)
    validation_bits_per_code: float | None  # on the validation split, at the selected step
    train_bits_per_code: float | None
    steps: int  # configured
    trained_steps: int | None = None  # fewer than steps when early stopping ended training
    selected_step: int  # the step whose weights were kept (best validation score)
    registered_model: str | None = None  # models:/<name>/<version>, when registered


class TrainPriorManifest(StageManifest):
    """One trained prior per code level, coarsest first."""

    stage: ClassVar[str] = "train_prior"

    levels: list[str]
    priors: dict[str, PriorEntry]
    tokenizer: TokenizerIdentity  # the autoencoder whose codes the priors model
    image_size: list[int]  # [H, W] of the tokenizer's images
    channels: int
    class_names: list[str]  # the priors' labels: merged by name over the corpora
    corpora: list[CorpusCodes]  # the code datasets trained on, with their label mappings
    labelled: bool = True  # false: unlabelled codes, unconditional priors (no class_names)

    def summary(self) -> str:
        bits = {
            level: round(p.validation_bits_per_code, 3)
            for level, p in self.priors.items()
            if p.validation_bits_per_code is not None
        }
        unconditional = "" if self.labelled else " (unlabelled corpus, unconditional priors)"
        return f"validation bits/code {bits}{unconditional}"


class RejectionStats(ManifestModel):
    drawn: int
    kept: int
    acceptance_rate: float
    drawn_classified_as_class: float  # how often the classifier agreed before any rejection
    mean_confidence_drawn: float
    mean_confidence_kept: float
    min_confidence_kept: float


class ClassSamples(ManifestModel):
    count: int
    dir: str
    drawn: int
    grid: str
    rejection: RejectionStats | None = None


class LevelSettings(ManifestModel):
    """How one level's codes were drawn."""

    temperature: float
    top_k: int | None
    top_p: float | None
    guidance: float = 1.0  # classifier-free guidance (1: none; manifests before it had none)


class SampleSettings(ManifestModel):
    per_class: int
    draws_per_class: int
    temperature: float  # the stage's; each level's, sample.levels included, under levels
    top_k: int | None
    top_p: float | None
    method: str
    seed: int
    rejection: dict[str, Any]
    levels: dict[str, LevelSettings] = {}  # level -> what it was drawn with, top first
    guidance: float = 1.0  # the stage's (1: none; manifests before it had none)


class SampleManifest(StageManifest):
    """The generated images, class by class, and how they were drawn."""

    stage: ClassVar[str] = "sample"

    classes: dict[str, ClassSamples]  # in request order
    settings: SampleSettings
    samples: int
    levels: list[str]
    class_names: list[str]
    checkpoint: str
    priors: dict[str, str]  # level -> prior checkpoint
    sampling_seconds: float
    # false: unconditional priors of an unlabelled corpus, whose samples are all in classes'
    # one entry, "unconditional" (pipelines.generation.UNCONDITIONAL), not a class of the corpus
    labelled: bool = True

    def summary(self) -> str:
        if not self.labelled:
            return f"{self.samples} images (unlabelled corpus, unconditional priors)"
        return f"{self.samples} images of {len(self.classes)} classes"


class EvaluateManifest(StageManifest):
    """The pipeline's figures and where its report is."""

    stage: ClassVar[str] = "evaluate"

    metrics: dict[str, float]
    report: str
    report_html: str
    levels: list[str]
    cas_skipped: str | None  # why CAS was not computed, when it was not
    judge_seed: int | None = None  # seed of the classifier judging the samples (never rejection's)
    feature_network: str | None = None  # what computed quality/fid, precision and recall
    # Every CAS classifier's prediction per image (Parquet), None when CAS did not run.
    predictions: str | None = None

    def summary(self) -> str:
        shown = (
            "test/psnr",
            "cas/generated_to_real",
            "cas/real_to_generated",
            "cas/real_to_real",
        )
        return format_metrics(self.metrics, shown)
