"""Stage 3: train the autoregressive priors over the code maps with Ray Train.

A two-level autoencoder gets two priors, trained one after the other, each in its own Ray Train run:
the top prior p(top | class) and the bottom prior p(bottom | top, class), which reads the top map
as its condition. A one-level model gets one prior p(codes | class), configured by
``train_prior.top``. Sizes (codes, map shapes, classes) come from the tokenize manifest; the
architecture from ``train_prior.<level>``.

Writes ``<stage_dir>/<level>.pt`` (vq_core checkpoint format; extra: level, condition level, step,
metrics) per prior. Held-out bits per code are logged as ``<level>/heldout_bits_per_code``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import ray
import torch
import torch.nn.functional as F
from torch import nn

from pipelines import storage
from pipelines.config import PriorSection, TrainPriorSection
from pipelines.manifest import require_manifest
from pipelines.shards import code_dataset
from pipelines.stage import StageContext
from pipelines.training import fit, load_final_model, publish_model, run_trainer, take_columns
from vq_core.checkpoint import load_checkpoint, model_class, model_from_config

log = logging.getLogger("vqpipe")

# train_prior.<level>.kind -> the vq_core checkpoint registry name of the prior class.
PRIOR_CLASSES = {"pixelsnail": "PixelSNAIL", "pixelcnn": "GatedPixelCNN"}


@dataclass(frozen=True)
class PriorPlan:
    """One prior to train: its level, the level it is conditioned on, knobs and full model config."""

    level: str
    condition: str | None
    knobs: PriorSection
    model_name: str
    model_config: dict[str, Any]


def plan_priors(tokenized: dict[str, Any], section: TrainPriorSection) -> list[PriorPlan]:
    """The priors a tokenize manifest calls for, coarsest level first, with derived sizes."""
    levels = list(tokenized["levels"])
    if len(levels) not in (1, 2):
        raise ValueError(f"expected one or two code levels in the tokenize manifest, got {levels}")
    sizes = tokenized["codebook_sizes"]
    shapes = tokenized["code_shapes"]
    class_names = tokenized.get("class_names") or []
    plans = []
    for index, level in enumerate(levels):
        knobs = section.top if index == 0 else section.bottom
        condition = levels[0] if index == 1 else None
        derived = {
            "num_codes": int(sizes[level]),
            "height": int(shapes[level][0]),
            "width": int(shapes[level][1]),
            # A single class carries no information; the prior is then unconditional.
            "num_classes": len(class_names) if len(class_names) > 1 else 0,
        }
        if condition is not None:
            derived |= {
                "condition_num_codes": int(sizes[condition]),
                "condition_height": int(shapes[condition][0]),
                "condition_width": int(shapes[condition][1]),
            }
        name = PRIOR_CLASSES[knobs.kind]
        fields = {f.name for f in dataclasses.fields(model_class(name).config_class)}
        missing = sorted(set(derived) - fields)
        if missing:
            raise ValueError(
                f"train_prior.{'top' if index == 0 else 'bottom'}.kind {knobs.kind!r} cannot be "
                f"used for the {level!r} prior: its config lacks {missing}"
            )
        plans.append(PriorPlan(level, condition, knobs, name, {**knobs.model, **derived}))
    return plans


def bits_per_code(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of ``codes`` under ``logits`` (B x K x h x w), in bits."""
    return F.cross_entropy(logits.float(), codes) / math.log(2)


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
    """Held-out negative log-likelihood in bits per code (every code weighs the same)."""
    num_classes = model.config.num_classes
    total, count = 0.0, 0
    for start in range(0, len(heldout[plan.level]), batch_size):
        batch = {
            k: torch.as_tensor(v[start : start + batch_size]).to(device) for k, v in heldout.items()
        }
        codes, labels, condition = prior_inputs(batch, plan, num_classes)
        total += float(model.loss(codes, labels, condition)) * codes.numel()
        count += codes.numel()
    return {"heldout_bits_per_code": total / max(count, 1)}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    plan: PriorPlan = config["plan"]
    torch.manual_seed(config["seed"])  # same initial weights on every rank
    model = model_from_config(plan.model_name, plan.model_config)
    num_classes = model.config.num_classes
    evaluate_fn = None
    if config["heldout"] is not None:
        heldout = ray.get(config["heldout"])
        evaluate_fn = partial(
            evaluate_prior, heldout=heldout, plan=plan, batch_size=plan.knobs.batch_size
        )
    fit(
        model,
        prior_loss(plan, num_classes),
        plan.knobs,
        evaluate_fn=evaluate_fn,
        tracking=config["tracking"],
        metric_prefix=f"{plan.level}/",
        dtypes=config["dtypes"],
        checkpoint_extra={"level": plan.level, "condition": plan.condition},
        seed=config["seed"],
        # Small corpora overfit a prior quickly: keep the weights with the best held-out score.
        select_metric="heldout_bits_per_code",
    )


def _columns(plan: PriorPlan) -> list[str]:
    return [plan.level, "label"] + ([plan.condition] if plan.condition else [])


def read_heldout(tokenize_dir: str, plans: list[PriorPlan]) -> dict[str, np.ndarray]:
    """The held-out codes every prior evaluates on, read once for all of them (int64)."""
    count = max(p.knobs.holdout_batches * p.knobs.batch_size for p in plans)
    columns = sorted({c for p in plans for c in _columns(p)})
    heldout = take_columns(code_dataset(tokenize_dir, split="holdout"), count, columns)
    if len(heldout["label"]) == 0:
        log.warning("train_prior: the held-out split is empty; the priors train without evaluation")
    return heldout


def _train_one(
    ctx: StageContext, plan: PriorPlan, tokenize_dir: str, heldout: dict[str, np.ndarray]
) -> tuple[nn.Module, dict]:
    columns = _columns(plan)
    count = plan.knobs.holdout_batches * plan.knobs.batch_size
    heldout = {c: heldout[c][:count] for c in columns}
    loop_config = {
        "plan": plan,
        "heldout": ray.put(heldout) if len(heldout["label"]) else None,
        "tracking": ctx.tracking,
        "seed": ctx.cfg.seed,
        "dtypes": {c: torch.int64 for c in columns},
    }
    # Training codes travel in their stored dtype (uint8/uint16: 4-8x less data than int64) and
    # become int64 as torch batches.
    train = code_dataset(tokenize_dir, split="train", as_int64=False).select_columns(columns)
    result = run_trainer(
        train_loop_per_worker,
        loop_config,
        name=f"train_prior-{plan.level}-{ctx.fingerprint}",
        stage_dir=ctx.stage_dir,
        knobs=plan.knobs,
        datasets={"train": train},
    )
    return load_final_model(result, prefer_best=True)


def run(ctx: StageContext) -> dict[str, Any]:
    tokenize_dir = ctx.cfg.stage_dir("tokenize")
    tokenized = require_manifest(tokenize_dir, "tokenize")
    plans = plan_priors(tokenized, ctx.cfg.train_prior)
    heldout = None
    priors: dict[str, Any] = {}
    for plan in plans:
        uri = storage.join(ctx.stage_dir, f"{plan.level}.pt")
        if storage.exists(uri):
            # Written only once that prior finished: an earlier attempt died on a later prior.
            log.info("train_prior: reusing the finished %s prior at %s", plan.level, uri)
            data = storage.read_bytes(uri)
            _, extra = load_checkpoint(data)
        else:
            log.info("train_prior: training the %s prior (%s)", plan.level, plan.knobs.kind)
            if heldout is None:
                heldout = read_heldout(tokenize_dir, plans)
            model, extra = _train_one(ctx, plan, tokenize_dir, heldout)
            data = publish_model(model, uri, extra)
        ctx.tracking.log_bytes(data, f"priors/{plan.level}.pt")
        metrics = extra.get("metrics", {})
        priors[plan.level] = {
            "checkpoint": uri,
            "kind": plan.knobs.kind,
            "condition": plan.condition,
            "heldout_bits_per_code": metrics.get("heldout_bits_per_code"),
            "train_bits_per_code": metrics.get("train_bits_per_code"),
            "steps": plan.knobs.steps,
            "selected_step": int(extra["step"]),
        }
        log.info("train_prior: %s prior %s", plan.level, priors[plan.level])
    return {"levels": [p.level for p in plans], "priors": priors}
