"""Stage 3: train the autoregressive priors over the code maps with Ray Train.

Each code level gets one prior, trained one after the other, coarsest first, each in its own Ray
Train run: the top prior p(top | class), and every level below it p(level | level above, class),
which reads the map of the level directly above as its condition (``vq_core.kinds.
prior_conditions``). A two-level VQ-VAE-2 gets p(top | class) and p(bottom | top, class); a
three-level one also p(middle | top, class) between them; a one-level model one prior
p(codes | class). Each prior is configured by ``train_prior.<level>``, the level's name. Sizes
(codes, map shapes, classes) and the levels come from the tokenize manifest; the architecture from
``train_prior.<level>``. The codes of an unlabelled corpus (no classes), or of a single class,
give unconditional priors (``num_classes`` 0): p(top), p(bottom | top).

The codes are this run's tokenize output, or the union of the code datasets that
``train_prior.shards`` lists (``pipelines.data.code_union``: one tokenizer, keys prefixed with each
corpus' name, classes merged by name). The manifest records the tokenizer, the merged class names
(the labels the priors are conditioned on, which sample uses) and each corpus' label mapping.

Writes ``<stage_dir>/<level>.pt`` (vq_core checkpoint format; extra: level, condition level, step,
metrics) per prior. Validation bits per code are logged as ``<level>/validation_bits_per_code``
and pick the weights kept (the best step); the test split's figure is the evaluate stage's.
Training reads the train split of the shards through a seeded per-rank reader
(``pipelines.data.epochs``): shards permuted per epoch, a local shuffle buffer, the same batches
whatever else runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import ray
import torch
from torch import nn

from pipelines.checkpoint_meta import CheckpointMeta, load_with_meta
from pipelines.config import PipelineConfig, PriorSection, TrainPriorSection
from pipelines.data import storage
from pipelines.data.code_union import CodeUnion, manifest_uri, read_member, unite
from pipelines.data.corpus import open_corpus
from pipelines.data.epochs import EpochReader
from pipelines.errors import ConfigError, UserError
from pipelines.manifest import fingerprint, require_manifest
from pipelines.sizing import MemoryProbe, preflight
from pipelines.stage import StageContext, StageSpec
from pipelines.stage_manifests import PriorEntry, TokenizeManifest, TrainPriorManifest
from pipelines.tokenizer import read_tokenizer, tracking_uri_for
from pipelines.training import (
    fit,
    is_local_ray,
    publish_model,
    run_trainer,
    take_columns,
    training_threads,
)
from vq_core.checkpoint import model_from_config
from vq_core.kinds import autoencoder_fields, get_kind, prior_conditions, prior_fields
from vq_core.pixelcnn import bits_per_code

log = logging.getLogger("vqpipe")


@dataclass(frozen=True)
class PriorPlan:
    """One prior to train: its level, the level it is conditioned on, knobs and full model config."""

    level: str
    condition: str | None
    knobs: PriorSection
    model_name: str
    model_config: dict[str, Any]


def plan_priors(
    tokenized: TokenizeManifest, section: TrainPriorSection, num_classes: int | None = None
) -> list[PriorPlan]:
    """The priors a tokenize manifest calls for, coarsest level first, with derived sizes: one per
    code level, configured by ``train_prior.<level>``, conditioned as ``prior_conditions`` says.
    ``num_classes`` (default: the manifest's) is the merged count of a union."""
    if num_classes is None:
        num_classes = len(tokenized.class_names)
    return plan_priors_for(
        tokenized.levels,
        tokenized.codebook_sizes,
        tokenized.code_shapes,
        section,
        num_classes,
        source=f"the tokenizer of the code shards, {tokenized.tokenizer.describe()},",
    )


def plan_priors_for(
    levels: list[str],
    sizes: dict[str, int],
    shapes: dict[str, list[int]],
    section: TrainPriorSection,
    num_classes: int,
    source: str = "the autoencoder",
) -> list[PriorPlan]:
    """``plan_priors`` for code maps described by their levels, codebook sizes and shapes.
    ``source`` names where the levels come from, for the error a section of another level gets."""
    section.check_levels(levels, source)
    plans = []
    for level, condition in prior_conditions(levels).items():
        knobs = section.for_level(level, levels)
        derived = prior_fields(
            sizes[level],
            shapes[level],
            num_classes,
            (sizes[condition], shapes[condition]) if condition else None,
        )
        kind = get_kind(knobs.kind)
        try:
            kind.config(knobs.model, derived)  # the config class checks the values
        except ValueError as err:
            raise ConfigError(
                f"train_prior.{level}.kind {knobs.kind!r} cannot be used for the {level!r} "
                f"prior: {err}"
            ) from None
        plans.append(
            PriorPlan(level, condition, knobs, kind.class_name, {**knobs.model, **derived})
        )
    return plans


def prior_inputs(
    batch: dict[str, Any], plan: PriorPlan, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(codes, labels, condition) of a batch as long tensors; labels only for a class prior."""
    codes = torch.as_tensor(batch[plan.level]).long()
    labels = torch.as_tensor(batch["label"]).long() if num_classes else None
    condition = torch.as_tensor(batch[plan.condition]).long() if plan.condition else None
    return codes, labels, condition


def prior_loss(plan: PriorPlan, num_classes: int):
    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor], step: int):
        codes, labels, condition = prior_inputs(batch, plan, num_classes)
        # Through forward (not .loss) so that DDP sees the pass and averages the gradients.
        bits = bits_per_code(model(codes, labels, condition), codes)
        return bits, {"train_bits_per_code": bits}

    return loss_fn


def evaluate_prior(
    model: nn.Module,
    device: torch.device,
    heldout: dict[str, np.ndarray],
    plan: PriorPlan,
    batch_size: int,
) -> dict[str, float]:
    """Validation negative log-likelihood in bits per code (every code weighs the same)."""
    num_classes = model.config.num_classes
    total, count = 0.0, 0
    for start in range(0, len(heldout[plan.level]), batch_size):
        batch = {
            k: torch.as_tensor(v[start : start + batch_size]).to(device) for k, v in heldout.items()
        }
        codes, labels, condition = prior_inputs(batch, plan, num_classes)
        total += float(model.loss(codes, labels, condition)) * codes.numel()
        count += codes.numel()
    return {"validation_bits_per_code": total / max(count, 1)}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train the priors of ``config["priors"]`` in turn in this worker group, each with its own
    checkpoints; rank 0 publishes each finished prior to its file. A prior an earlier attempt of
    the run published is skipped, so a restarted run goes on with the prior it was training."""
    rank = ray.train.get_context().get_world_rank()
    for prior in config["priors"]:
        if storage.exists(prior["uri"]):
            continue
        chosen = _fit_prior(prior, config)
        if rank == 0:
            if chosen is None:
                raise RuntimeError(f"the {prior['plan'].level} prior ended without a checkpoint")
            model, meta = load_with_meta(chosen, map_location="cpu")
            publish_model(model, prior["uri"], meta)


def _fit_prior(prior: dict[str, Any], config: dict[str, Any]) -> bytes | None:
    plan: PriorPlan = prior["plan"]
    torch.manual_seed(config["seed"])  # same initial weights on every rank
    model = model_from_config(plan.model_name, plan.model_config)
    num_classes = model.config.num_classes
    evaluate_fn = None
    if prior["heldout"] is not None:
        heldout = ray.get(prior["heldout"])
        evaluate_fn = partial(
            evaluate_prior, heldout=heldout, plan=plan, batch_size=plan.knobs.batch_size
        )
    return fit(
        model,
        prior_loss(plan, num_classes),
        plan.knobs,
        data=prior["data"],
        threads=prior["threads"],
        evaluate_fn=evaluate_fn,
        tracking=config["tracking"],
        metric_prefix=f"{plan.level}/",
        dtypes=prior["dtypes"],
        checkpoint_meta=CheckpointMeta(level=plan.level, condition=plan.condition),
        seed=config["seed"],
        # Small corpora overfit a prior quickly: keep the weights with the best validation score.
        select_metric="validation_bits_per_code",
        progress_phase=_label(plan),
    )


def _columns(plan: PriorPlan) -> list[str]:
    return [plan.level, "label"] + ([plan.condition] if plan.condition else [])


def read_heldout(union: CodeUnion, plans: list[PriorPlan]) -> dict[str, np.ndarray]:
    """The validation codes every prior evaluates on, read once for all of them (int64): the
    same key-hash subset in every run."""
    count = max(p.knobs.holdout_batches * p.knobs.batch_size for p in plans)
    columns = sorted({c for p in plans for c in _columns(p)})
    heldout = take_columns(union.dataset("validation"), count, columns)
    if len(heldout["label"]) == 0:
        log.warning(
            "train_prior: the validation split is empty; the priors train without evaluation "
            "and keep their last weights"
        )
    return heldout


def _label(plan: PriorPlan) -> str:
    return f"train_prior {plan.level}"


def _workers(knobs: PriorSection) -> tuple:
    """What a Ray Train run asks of the cluster for a prior: priors asking the same share a run."""
    return (knobs.num_workers, knobs.cpus_per_worker, knobs.use_gpu, knobs.max_failures)


def run_groups(plans: list[PriorPlan]) -> list[list[PriorPlan]]:
    """The priors in Ray Train runs: consecutive levels whose settings ask for the same workers
    train in one run, one after the other (one worker group started, not one per level)."""
    groups: list[list[PriorPlan]] = []
    for plan in plans:
        if groups and _workers(groups[-1][-1].knobs) == _workers(plan.knobs):
            groups[-1].append(plan)
        else:
            groups.append([plan])
    return groups


def _prior_uri(ctx: StageContext, plan: PriorPlan) -> str:
    return storage.join(ctx.stage_dir, f"{plan.level}.pt")


def _train_group(
    ctx: StageContext,
    group: list[PriorPlan],
    todo: list[PriorPlan],
    union: CodeUnion,
    heldout: dict[str, np.ndarray],
) -> None:
    """Train the priors ``todo`` of ``group`` in one Ray Train run; each lands in its file. The
    run is named after the whole group, so a re-run with fewer priors left resumes it."""
    tokenized = union.first
    local_ray = is_local_ray(ctx.cfg.ray)
    priors = []
    for plan in todo:
        columns = _columns(plan)
        count = plan.knobs.holdout_batches * plan.knobs.batch_size
        held = {c: heldout[c][:count] for c in columns}
        data = EpochReader.for_code_shards(
            union.shard_uris(),
            list(tokenized.levels),
            "train",
            validation_fraction=tokenized.validation_fraction,
            test_fraction=tokenized.test_fraction,
            seed=ctx.cfg.seed,
            shuffle_buffer=plan.knobs.shuffle_buffer,
            columns=tuple(columns),
            removed=union.removed(),
            label_maps=union.shard_label_maps(),
            labelled=union.labelled,
        )
        priors.append(
            {
                "plan": plan,
                "uri": _prior_uri(ctx, plan),
                "data": data,
                "threads": training_threads(plan.knobs, local_ray),
                "heldout": ray.put(held) if len(held["label"]) else None,
                "dtypes": {c: torch.int64 for c in columns},
            }
        )
        log.info("train_prior: training the %s prior (%s)", plan.level, plan.knobs.kind)
        preflight(memory_probe(plan), ctx.tracking)
    levels = "-".join(p.level for p in group)
    run_trainer(
        train_loop_per_worker,
        {"priors": priors, "tracking": ctx.tracking, "seed": ctx.cfg.seed},
        name=f"{ctx.stage}-{levels}-{ctx.fingerprint}",
        stage_dir=ctx.stage_dir,
        knobs=todo[0].knobs,
        phases=[(_label(p), p.knobs) for p in todo],
        section=" / ".join(f"{ctx.stage}.{p.level}" for p in todo),
        resource_wait_seconds=ctx.cfg.ray.resource_wait_seconds,
        local_ray=local_ray,
    )
    for plan in todo:
        if not storage.exists(_prior_uri(ctx, plan)):
            raise RuntimeError(
                f"train_prior: the Ray Train run ended without the {plan.level} prior at "
                f"{_prior_uri(ctx, plan)}"
            )


def _probe_codes(plan: PriorPlan, n: int) -> dict[str, torch.Tensor]:
    """n random code maps (and labels, condition maps) of the plan's shapes, as a batch."""
    generator = torch.Generator().manual_seed(n)
    config = plan.model_config

    def codes(count: int, height: int, width: int) -> torch.Tensor:
        return torch.randint(0, count, (n, height, width), generator=generator)

    batch = {
        plan.level: codes(config["num_codes"], config["height"], config["width"]),
        "label": torch.randint(0, max(config["num_classes"], 1), (n,), generator=generator),
    }
    if plan.condition:
        batch[plan.condition] = codes(
            config["condition_num_codes"], config["condition_height"], config["condition_width"]
        )
    return batch


def memory_probe(plan: PriorPlan) -> MemoryProbe:
    """The prior its workers train, for the memory estimate (pipelines.sizing)."""
    return MemoryProbe(
        section=f"train_prior.{plan.level}",
        knobs=plan.knobs,
        build=partial(model_from_config, plan.model_name, plan.model_config),
        make_batch=partial(_probe_codes, plan),
        loss_fn=prior_loss(plan, plan.model_config["num_classes"]),
    )


def memory_probes(cfg: PipelineConfig) -> list[MemoryProbe]:
    """The priors a config calls for, from the autoencoder it trains or pins (class count: the
    corpus', when its listing can be read; the class embedding weighs little either way)."""
    if cfg.tokenize.checkpoint:
        pinned = read_tokenizer(cfg.tokenize.checkpoint, tracking_uri_for(cfg))
        autoencoder = pinned.model
        source = f"the pinned tokenizer {pinned.identity.describe()}"
    else:
        section = cfg.train_vqvae
        autoencoder = get_kind(section.kind).build(
            section.model, autoencoder_fields(cfg.data.channels)
        )
        source = f"train_vqvae (kind {section.kind!r})"
    try:
        num_classes = len(open_corpus(cfg.data).class_names)
    except (UserError, OSError):
        num_classes = len(cfg.data.class_names or [])
    shapes = autoencoder.code_shape(*cfg.data.size_hw)
    levels = list(autoencoder.levels)
    plans = plan_priors_for(
        levels,
        dict(zip(levels, autoencoder.codebook_sizes)),
        {level: list(shape) for level, shape in zip(levels, shapes)},
        cfg.train_prior,
        num_classes,
        source=source,
    )
    return [memory_probe(plan) for plan in plans]


def _log_prior(ctx: StageContext, plan: PriorPlan, checkpoint: bytes) -> str | None:
    """Log the prior as an MLflow model that samples codes for class labels (registered as
    ``<mlflow.registered_models.prior>-<level>`` when the config names a prefix)."""
    settings = ctx.cfg.mlflow
    if not (settings.log_models and ctx.tracking.enabled):
        return None
    from pipelines.mlflow_models import log_checkpoint_model

    config = plan.model_config
    example = {"labels": np.zeros(1, dtype=np.int64)}
    if plan.condition:
        shape = (1, config["condition_height"], config["condition_width"])
        example["condition"] = np.zeros(shape, dtype=np.int64)
    output = np.zeros((1, config["height"], config["width"]), dtype=np.int64)
    prefix = settings.registered_models.prior
    return log_checkpoint_model(
        ctx.tracking,
        "prior",
        checkpoint,
        example,
        output,
        f"{prefix}-{plan.level}" if prefix else None,
        name=f"prior-{plan.level}",
    )


def _entry(ctx: StageContext, plan: PriorPlan) -> PriorEntry:
    """Log a finished prior's file to MLflow (and register it); its manifest entry."""
    uri = _prior_uri(ctx, plan)
    data = storage.read_bytes(uri)
    _, meta = load_with_meta(data)
    ctx.tracking.log_bytes(data, f"priors/{plan.level}.pt")
    registered = _log_prior(ctx, plan, data)
    metrics = meta.metrics
    entry = PriorEntry(
        checkpoint=uri,
        kind=plan.knobs.kind,
        condition=plan.condition,
        validation_bits_per_code=metrics.get("validation_bits_per_code"),
        train_bits_per_code=metrics.get("train_bits_per_code"),
        steps=plan.knobs.steps,
        trained_steps=plan.knobs.steps if meta.trained_steps is None else meta.trained_steps,
        selected_step=meta.trained_step(),
        registered_model=registered,
    )
    log.info("train_prior: %s prior %s", plan.level, entry.model_dump())
    return entry


def _is_this_run(entry: str, output_dir: str) -> bool:
    """Whether a train_prior.shards entry names this run's own tokenize output."""
    here = TokenizeManifest.directory(output_dir)
    return entry.rstrip("/") in (output_dir.rstrip("/"), here, TokenizeManifest.uri(output_dir))


def code_union(cfg: Any) -> CodeUnion:
    """What the priors train on: this run's tokenize output, or the train_prior.shards union."""
    entries = cfg.train_prior.shards
    if entries is None:
        return unite(
            [require_manifest(cfg.output_dir, TokenizeManifest)],
            [TokenizeManifest.uri(cfg.output_dir)],
        )
    members, sources = [], []
    for entry in entries:
        if _is_this_run(entry, cfg.output_dir):
            members.append(require_manifest(cfg.output_dir, TokenizeManifest))
            sources.append(TokenizeManifest.uri(cfg.output_dir))
        else:
            members.append(read_member(entry))
            sources.append(manifest_uri(entry))
    return unite(members, sources)


def _external_inputs(cfg: Any) -> dict[str, str]:
    """The other runs' code datasets in train_prior.shards: their fingerprints and runs. Read and
    checked against each other here, so a mismatch fails before anything is written; so are the
    level sections against a pinned tokenizer's levels, when this run's codes are trained on."""
    if cfg.tokenize.checkpoint and _upstream_for(cfg):
        pinned = read_tokenizer(cfg.tokenize.checkpoint, tracking_uri_for(cfg))
        cfg.train_prior.check_levels(
            pinned.levels, f"the pinned tokenizer {pinned.identity.describe()}"
        )
    entries = [e for e in cfg.train_prior.shards or () if not _is_this_run(e, cfg.output_dir)]
    members = [read_member(entry) for entry in entries]
    if members:
        unite(members, [manifest_uri(e) for e in entries])
    return {
        f"shards.{manifest_uri(e)}": fingerprint(m.fingerprint, m.mlflow_run_id)
        for e, m in zip(entries, members)
    }


def _upstream_for(cfg: Any) -> tuple:
    entries = cfg.train_prior.shards
    if entries is None or any(_is_this_run(e, cfg.output_dir) for e in entries):
        return (TokenizeManifest,)
    return ()


def run(ctx: StageContext) -> TrainPriorManifest:
    union = code_union(ctx.cfg)
    tokenized = union.first
    if union.prefixed:
        log.info(
            "train_prior: %d code datasets, %d samples, classes %s",
            len(union.members),
            sum(m.samples for m in union.members),
            list(union.class_names),
        )
    if not union.labelled:
        log.info("train_prior: the codes are unlabelled; the priors train unconditionally")
    plans = plan_priors(tokenized, ctx.cfg.train_prior, num_classes=len(union.class_names))
    # A prior's file is written only once it finished: an earlier attempt died on a later one.
    finished = {p.level for p in plans if storage.exists(_prior_uri(ctx, p))}
    for plan in plans:
        if plan.level in finished:
            log.info(
                "train_prior: reusing the finished %s prior at %s",
                *(plan.level, _prior_uri(ctx, plan)),
            )
    if len(finished) < len(plans):
        heldout = read_heldout(union, plans)
        for group in run_groups(plans):
            todo = [p for p in group if p.level not in finished]
            if todo:
                _train_group(ctx, group, todo, union, heldout)
    priors = {plan.level: _entry(ctx, plan) for plan in plans}
    return TrainPriorManifest(
        levels=[p.level for p in plans],
        priors=priors,
        tokenizer=union.tokenizer,
        image_size=list(tokenized.image_size),
        channels=tokenized.channels,
        class_names=list(union.class_names),
        corpora=union.corpora(),
        labelled=union.labelled,
    )


def _check_inputs(cfg: Any) -> None:
    """The code shards the priors will read are there, as tokenize wrote them."""
    code_union(cfg)  # unite checks every member's shard files


SPEC = StageSpec(
    manifest=TrainPriorManifest,
    run=run,
    memory_probes=memory_probes,
    description="train the class-conditional priors over the code shards with Ray Train",
    upstream=(TokenizeManifest,),
    sections=("seed",),
    upstream_for=_upstream_for,
    external_inputs=_external_inputs,
    check_inputs=_check_inputs,
)
