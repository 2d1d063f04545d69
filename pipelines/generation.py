"""Drawing images from trained priors: the work plan, the sampler actors, rejection, the outputs.

For each requested class (an unlabelled corpus' unconditional priors: one set of
``sample.per_class`` images, under the name ``unconditional``) the priors draw the code maps level by level, top down: the top prior a
top map given the class, every lower level's prior a map given the class and the map just drawn for
the level above it (``vq_core.sampling.sample_levels``), each level with its own temperature, top_k
and top_p (``sample.levels``, defaulting to the stage's); once every level is drawn the decoder
turns the maps into an image (a single-level model has one prior). The work is cut into batches of (class, count, seed) that an
actor pool works through; each actor loads the models once. Every batch's seed is derived from the
sampling seed, the class name and the batch's index within its class, so a re-run draws the same
images, and a class's images do not change when other classes are added to the request.

With ``sample.rejection.enabled``, the VQ-VAE-2 paper's classifier-based rejection: a classifier
trained on the real corpus scores ceil(per_class / keep_fraction) draws per class and only the
per_class draws it assigns to the requested class most confidently are kept.

The sample stage draws with ``sample.seed``; the evaluate stage draws again with further seeds.
Output layout of a folder drawn into::

    <class>/00000.png ...     the kept samples (with rejection, ordered by confidence)
    grid-<class>.png          a grid of the first grid_images of them
    done-<class>.json         written last: the class's manifest entry (lets a re-run skip it)
    classifier.pt             the rejection classifier, when rejection is on
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipelines import console
from pipelines.config import SampleSection, rejection_needs_labels
from pipelines.data import storage
from pipelines.errors import ConfigError, InputError
from pipelines.stage import StageContext, ensure_ray
from pipelines.stage_manifests import ClassSamples, RejectionStats, TrainPriorManifest
from pipelines.tokenizer import read_identified, tracking_uri_for

log = logging.getLogger("vqpipe")

# Name of the single "class" of a corpus without labels (priors trained unconditionally).
UNCONDITIONAL = "unconditional"


REJECTION_CLASSIFIER = "classifier.pt"


@dataclass(frozen=True)
class SampleBatch:
    """One unit of work: ``count`` samples of one class, drawn with one seed."""

    class_name: str
    label: int  # -1 for an unconditional prior
    batch_index: int  # within the class
    first_draw: int  # index of the batch's first sample among the class's draws
    count: int
    seed: int


def batch_seed(seed: int, class_name: str, batch_index: int) -> int:
    """A 63-bit seed from the stage seed, the class and the batch index (stable across runs)."""
    digest = hashlib.sha256(f"{seed}/{class_name}/{batch_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def resolve_classes(requested: list[str] | None, class_names: list[str]) -> list[str]:
    """The class names to sample: all of ``class_names`` when ``requested`` is None."""
    if not class_names:
        if requested:
            raise ConfigError(
                f"sample.classes is {requested}, but the corpus has no class labels (the priors "
                "are unconditional); leave sample.classes unset"
            )
        return [UNCONDITIONAL]
    if requested is None:
        return list(class_names)
    unknown = [name for name in requested if name not in class_names]
    if unknown:
        raise ConfigError(
            f"sample.classes has unknown class(es) {unknown}; valid classes: {list(class_names)}"
        )
    if len(set(requested)) != len(requested):
        raise ConfigError(f"sample.classes lists a class twice: {requested}")
    return list(requested)


def check_path_safe(name: str) -> None:
    # Class names become folder and file names.
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ConfigError(f"class name {name!r} cannot be used as a folder name")


def plan_batches(
    classes: list[str], class_names: list[str], draws_per_class: int, batch_size: int, seed: int
) -> list[SampleBatch]:
    batches = []
    for name in classes:
        label = class_names.index(name) if class_names else -1
        for index, start in enumerate(range(0, draws_per_class, batch_size)):
            count = min(batch_size, draws_per_class - start)
            batches.append(
                SampleBatch(name, label, index, start, count, batch_seed(seed, name, index))
            )
    return batches


class Sampler:
    """A Ray Data actor: loads the autoencoder, the priors (and the rejection classifier) once,
    then turns each SampleBatch row into ``count`` rows of (class_name, draw, png, confidence)."""

    def __init__(
        self,
        autoencoder: list,
        priors: list[dict[str, Any]],
        settings: dict[str, Any],
        classifier_uri: str | None = None,
        use_gpu: bool = False,
    ):
        import ray

        from vq_core.checkpoint import load_checkpoint

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        # The autoencoder's checkpoint bytes, as an ObjectRef in a list: the driver read them
        # (and checked their sha256); a pinned checkpoint may be a file only the driver sees.
        self.autoencoder, _ = load_checkpoint(ray.get(autoencoder[0]), map_location=self.device)
        # Sampled in this order; a prior's condition level always comes before it.
        self.priors = [
            (
                p["level"],
                p["condition"],
                load_checkpoint(storage.read_bytes(p["checkpoint"]), map_location=self.device)[0],
            )
            for p in priors
        ]
        self.settings = settings
        self.classifier = None
        if classifier_uri is not None:
            from pipelines.evaluation.classifier import load_classifier

            self.classifier, _ = load_classifier(classifier_uri, map_location=self.device)

    @torch.inference_mode()
    def generate(self, label: int, count: int, seed: int) -> np.ndarray:
        """``count`` images (uint8 count x H x W x C) of class ``label`` (-1: unconditional)."""
        from pipelines.data.images import to_uint8
        from vq_core.sampling import sample_levels

        generator = torch.Generator(device=self.device).manual_seed(seed)
        labels = torch.full((count,), label, dtype=torch.long, device=self.device)
        codes = sample_levels(
            self.priors,
            count,
            labels,
            settings=self.settings["levels"],
            generator=generator,
            method=self.settings["method"],
        )
        images = self.autoencoder.decode_codes(tuple(codes[level] for level, _, _ in self.priors))
        return to_uint8(images.float().cpu())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipelines.data.images import encode_png, to_model_input
        from pipelines.evaluation.classifier import predict_proba

        out: dict[str, list] = {
            "class_name": [],
            "draw": [],
            "png": [],
            "confidence": [],
            "predicted": [],
        }
        for i in range(len(batch["class_name"])):
            label, count = int(batch["label"][i]), int(batch["count"][i])
            images = self.generate(label, count, int(batch["seed"][i]))
            confidence = np.full(count, np.nan, dtype=np.float32)
            predicted = np.full(count, -1, dtype=np.int64)
            if self.classifier is not None:
                # Score the images as they will be saved (uint8), not the decoder's raw floats.
                probs = predict_proba(self.classifier, to_model_input(images).to(self.device))
                confidence = probs[:, label].numpy().astype(np.float32)
                predicted = probs.argmax(dim=1).numpy()
            first = int(batch["first_draw"][i])
            for j in range(count):
                out["class_name"].append(str(batch["class_name"][i]))
                out["draw"].append(first + j)
                out["png"].append(encode_png(images[j]))
                out["confidence"].append(confidence[j])
                out["predicted"].append(predicted[j])
        return {
            "class_name": np.array(out["class_name"], dtype=object),
            "draw": np.array(out["draw"], dtype=np.int64),
            "png": np.array(out["png"], dtype=object),
            "confidence": np.array(out["confidence"], dtype=np.float32),
            "predicted": np.array(out["predicted"], dtype=np.int64),
        }


class ClassOutput:
    """Receives one class's draws in any order and writes the class's files.

    Without rejection every draw is written as it arrives. With rejection only the per_class most
    confident draws are kept (a bounded heap), then written most confident first.
    """

    def __init__(
        self,
        stage_dir: str,
        name: str,
        label: int,
        cfg: SampleSection,
        image_shape: tuple[int, int, int],
    ):
        self.stage_dir, self.name, self.label = stage_dir, name, label
        self.image_shape = image_shape  # H, W, C
        self.dir = storage.join(stage_dir, name)
        self.per_class, self.grid_images = cfg.per_class, cfg.grid_images
        self.rejection = cfg.rejection.enabled
        self.grid: dict[int, bytes] = {}
        self.best: list[tuple[float, int, bytes]] = []  # min-heap of (confidence, -draw, png)
        self.confidences: list[float] = []
        self.predicted: list[int] = []
        self.drawn = 0

    def add(self, draw: int, png: bytes, confidence: float, predicted: int) -> None:
        self.drawn += 1
        if not self.rejection:
            storage.write_bytes(storage.join(self.dir, f"{draw:05d}.png"), png)
            if draw < self.grid_images:
                self.grid[draw] = png
            return
        self.confidences.append(float(confidence))
        self.predicted.append(int(predicted))
        # Ties go to the earlier draw, so the kept set does not depend on arrival order.
        item = (float(confidence), -draw, png)
        if len(self.best) < self.per_class:
            heapq.heappush(self.best, item)
        elif item > self.best[0]:
            heapq.heapreplace(self.best, item)

    def finish(self) -> ClassSamples:
        """Write the kept samples (rejection) and the grid; return the class's manifest entry."""
        from pipelines.data.images import decode_image, encode_png, make_grid

        rejection = None
        if self.rejection:
            kept = sorted(self.best, reverse=True)
            for rank, (_, _, png) in enumerate(kept):
                storage.write_bytes(storage.join(self.dir, f"{rank:05d}.png"), png)
                if rank < self.grid_images:
                    self.grid[rank] = png
            kept_confidence = np.array([c for c, _, _ in kept])
            rejection = RejectionStats(
                drawn=self.drawn,
                kept=len(kept),
                acceptance_rate=len(kept) / self.drawn,
                drawn_classified_as_class=float(np.mean(np.array(self.predicted) == self.label)),
                mean_confidence_drawn=float(np.mean(self.confidences)),
                mean_confidence_kept=float(kept_confidence.mean()),
                min_confidence_kept=float(kept_confidence.min()),
            )
        expected = min(self.per_class, self.grid_images)
        if len(self.grid) != expected:
            raise RuntimeError(
                f"class {self.name!r}: {len(self.grid)} of the first {expected} samples arrived"
            )
        height, width, channels = self.image_shape
        tiles = np.stack(
            [decode_image(self.grid[i], (height, width), channels) for i in sorted(self.grid)]
        )
        grid = storage.join(self.stage_dir, f"grid-{self.name}.png")
        storage.write_bytes(grid, encode_png(make_grid(tiles)))
        return ClassSamples(
            count=self.per_class, dir=self.dir, drawn=self.drawn, grid=grid, rejection=rejection
        )


def done_uri(stage_dir: str, name: str) -> str:
    return storage.join(stage_dir, f"done-{name}.json")


def _generate(
    ctx: StageContext,
    batches: list[SampleBatch],
    autoencoder: bytes,
    priors: list[dict[str, Any]],
    classifier_uri: str | None,
    image_shape: tuple[int, int, int],
    label: str,
) -> dict[str, ClassSamples]:
    """Run the batches on an actor pool; write each class's files; return its manifest entries.
    ``label`` names the progress bar."""
    import ray

    cfg = ctx.cfg.sample
    settings = sampling_settings(cfg, [p["level"] for p in priors])
    items = [dataclasses.asdict(b) for b in batches]
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        Sampler,
        fn_constructor_kwargs={
            "autoencoder": [ray.put(autoencoder)],
            "priors": priors,
            "settings": settings,
            "classifier_uri": classifier_uri,
            "use_gpu": cfg.use_gpu,
        },
        batch_size=1,  # one SampleBatch per call: batch_size already sets the work per call
        compute=ray.data.ActorPoolStrategy(size=cfg.num_workers),
        num_cpus=cfg.cpus_per_worker,
        num_gpus=1 if cfg.use_gpu else 0,
    )
    outputs: dict[str, ClassOutput] = {}
    for b in batches:
        if b.class_name not in outputs:
            outputs[b.class_name] = ClassOutput(
                ctx.stage_dir, b.class_name, b.label, cfg, image_shape
            )
    done = 0
    total = sum(b.count for b in batches)
    with console.current().progress(label, total, "images") as progress:
        for rows in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for name, draw, png, confidence, predicted in zip(
                rows["class_name"], rows["draw"], rows["png"], rows["confidence"], rows["predicted"]
            ):
                outputs[str(name)].add(int(draw), bytes(png), float(confidence), int(predicted))
            done += len(rows["draw"])
            progress.update(done=done)
            log.info("%s: %d of %d draws", label, done, total)
    entries = {}
    for name, output in outputs.items():
        entries[name] = output.finish()
        # Written last: a class with this marker is complete and a resumed run skips it.
        storage.write_bytes(done_uri(ctx.stage_dir, name), entries[name].model_dump_json().encode())
    return entries


def sampling_settings(cfg: SampleSection, levels: list[str]) -> dict[str, Any]:
    """How the priors draw: the method, and each level's temperature, top_k and top_p (its
    ``sample.levels`` entry over the stage's). ConfigError for an entry of a level not in
    ``levels``."""
    cfg.check_levels(levels, "train_prior")
    return {"method": cfg.method, "levels": {level: cfg.for_level(level) for level in levels}}


def check_priors_take_guidance(cfg: SampleSection, trained: TrainPriorManifest) -> None:
    """Raise ConfigError for a level drawn with classifier-free guidance (guidance != 1) whose
    prior cannot be guided: it must be class-conditional and trained with label dropout, which
    gives it the "no class" label the guided draw contrasts the class with."""
    from vq_core.checkpoint import load_checkpoint

    for level in trained.levels:
        guidance = cfg.for_level(level)["guidance"]
        if guidance == 1:
            continue
        own = cfg.levels.get(level)
        key = "sample.guidance"
        if own is not None and own.guidance is not None:
            key = f"sample.levels.{level}.guidance"
        if not trained.labelled:
            raise ConfigError(
                f"{key}={guidance} guides the {level} codes towards their class, but the corpus "
                "has no labels (the priors are unconditional); leave guidance at 1.0"
            )
        prior, _ = load_checkpoint(storage.read_bytes(trained.priors[level].checkpoint))
        if prior.config.num_classes == 0:
            raise ConfigError(
                f"{key}={guidance} guides the {level} codes towards their class, but the {level} "
                f"prior is unconditional (the corpus has one class, {trained.class_names}); "
                "leave guidance at 1.0"
            )
        if prior.null_label is None:
            raise ConfigError(
                f"{key}={guidance} needs the {level} prior to be trained with label dropout, but "
                f"it was trained with label_dropout={prior.config.label_dropout} "
                f"(num_classes={prior.config.num_classes}); set "
                f"train_prior.{level}.model.label_dropout (0.1 is usual) and redo train_prior, "
                "or leave guidance at 1.0"
            )


def check_autoencoder_levels(autoencoder: bytes, trained: TrainPriorManifest) -> None:
    """Raise InputError unless the autoencoder that decodes the samples encodes the levels the
    priors draw, in the same order."""
    from pipelines.tokenizer import autoencoder_from_bytes

    model, _ = autoencoder_from_bytes(autoencoder, trained.tokenizer.describe())
    if list(model.levels) != list(trained.levels):
        raise InputError(
            f"the priors draw code levels {list(trained.levels)}, but the autoencoder "
            f"{trained.tokenizer.describe()} that decodes them has levels {list(model.levels)}; "
            "redo train_prior on codes of this autoencoder"
        )


def prior_order(trained: TrainPriorManifest) -> list[dict[str, Any]]:
    """The priors in sampling order; each one's condition level is sampled before it."""
    levels = trained.levels
    priors = []
    for level in levels:
        entry = trained.priors[level]
        if entry.condition is not None and entry.condition not in levels[: levels.index(level)]:
            raise ValueError(
                f"the {level} prior is conditioned on {entry.condition!r}, which is not a level "
                f"sampled before it (levels in order: {levels})"
            )
        priors.append(
            {"level": level, "checkpoint": entry.checkpoint, "condition": entry.condition}
        )
    return priors


def draws_per_class(cfg: SampleSection, class_names: list[str]) -> int:
    """Draws per class: per_class, or enough that rejection keeps per_class of them. An
    unlabelled corpus (no class names) is one "class", ``UNCONDITIONAL``, of per_class images."""
    rejection = cfg.rejection
    if not rejection.enabled:
        return cfg.per_class
    if not class_names:
        raise ConfigError(
            rejection_needs_labels("the corpus has no labels (the priors are unconditional)")
        )
    if len(class_names) < 2:
        raise ConfigError(
            f"sample.rejection needs a corpus with at least 2 classes to train its classifier, "
            f"got classes {class_names}"
        )
    # The small epsilon keeps 3 / 0.3 = 10.000000000000002 from becoming 11 draws.
    return math.ceil(cfg.per_class / rejection.keep_fraction - 1e-9)


def _finished_classes(stage_dir: str, classes: list[str]) -> dict[str, ClassSamples]:
    """The classes an interrupted run completed (their done marker is written last)."""
    done = {}
    for name in classes:
        if storage.exists(done_uri(stage_dir, name)):
            done[name] = ClassSamples.model_validate_json(
                storage.read_bytes(done_uri(stage_dir, name))
            )
    if done:
        log.info(
            "sample: %d class(es) already complete, %d to go", len(done), len(classes) - len(done)
        )
    return done


def _rejection_classifier(ctx: StageContext, class_names: list[str]) -> str | None:
    """Train (or reuse) the classifier that rejection scores draws with; its URI, or None."""
    rejection = ctx.cfg.sample.rejection
    if not rejection.enabled:
        return None
    from pipelines.evaluation.classifier import corpus_classifier

    uri = storage.join(ctx.stage_dir, REJECTION_CLASSIFIER)
    corpus_classifier(
        ctx.cfg.data,
        class_names,
        steps=rejection.classifier_steps,
        lr=rejection.classifier_lr,
        seed=ctx.cfg.sample.seed,
        max_images=rejection.max_images,
        cache_uri=uri,
    )
    return uri


def draw_samples(
    ctx: StageContext,
    trained: TrainPriorManifest,
    priors: list[dict[str, Any]],
    classes: list[str],
    seed: int,
    draws: int,
    classifier_uri: str | None = None,
) -> dict[str, ClassSamples]:
    """Draw ``classes`` into ``ctx.stage_dir`` with ``seed`` as ``ctx.cfg.sample`` says (classes
    an interrupted run finished are kept); their manifest entries in request order. The codes
    are decoded by the autoencoder the priors' codes came from (``trained.tokenizer``, pinned
    or trained), and the classes are the priors' (merged by name over several corpora).

    With rejection on, draws are scored by the classifier at ``classifier_uri``, or by one trained
    here (``<stage_dir>/classifier.pt``) when none is given. The evaluate stage calls this with
    other seeds to repeat the sampling.
    """
    cfg = ctx.cfg.sample
    entries = _finished_classes(ctx.stage_dir, classes)
    todo = [name for name in classes if name not in entries]
    if todo:
        ensure_ray(ctx.cfg)
        if classifier_uri is None:
            classifier_uri = _rejection_classifier(ctx, trained.class_names)
        batches = plan_batches(todo, trained.class_names, draws, cfg.batch_size, seed)
        log.info(
            "sample: %d draws per class for %s in %d batches on %d worker(s), seed %d",
            draws,
            todo,
            len(batches),
            cfg.num_workers,
            seed,
        )
        image_shape = (*trained.image_size, trained.channels)
        autoencoder = read_identified(trained.tokenizer, tracking_uri_for(ctx.cfg))
        check_autoencoder_levels(autoencoder, trained)
        # The sample stage's bar is "sample"; another stage drawing more sets (evaluate's further
        # seeds) names itself and the seed, so that its console does not seem to run sample again.
        label = "sample" if ctx.stage == "sample" else f"{ctx.stage} seed {seed}"
        entries.update(
            _generate(ctx, batches, autoencoder, priors, classifier_uri, image_shape, label)
        )
    return {name: entries[name] for name in classes}
