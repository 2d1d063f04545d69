"""train_prior on code shards written for the test, with a real local Ray and MLflow store."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from pipelines.config import TrainPriorSection, parse_config
from pipelines.data import storage
from pipelines.data.keys import split_of
from pipelines.data.shards import code_dtype, iter_code_samples, write_shard
from pipelines.manifest import write_manifest
from pipelines.stage import StageContext
from pipelines.stage_manifests import BadInputs, TokenizeManifest
from pipelines.stages import train_prior
from pipelines.tokenizer import TokenizerIdentity
from pipelines.tracking import Tracker
from tests.pipelines.conftest import tiny_raw_config
from vq_core.checkpoint import load_checkpoint

CLASSES = ["circle", "cross", "square", "triangle"]
K = 16
VALIDATION, TEST = 0.2, 0.2
STEPS = 4  # tiny_config: 4 steps per prior, eval/checkpoint every 2, log every 2


def write_tokenized(output_dir: str, count: int = 30) -> TokenizeManifest:
    """Code shards and a complete tokenize manifest for a VQ-VAE-2 with 2x2 top and 4x4 bottom maps.

    The codes have structure a prior can pick up: the top map depends on the class, and each
    bottom 2x2 patch repeats its top code.
    """
    rng = np.random.default_rng(0)
    keys = [f"{CLASSES[i % 4]}/{i:05d}" for i in range(count)]
    labels = [i % 4 for i in range(count)]
    top = (np.array(labels)[:, None, None] * 4 + rng.integers(0, 4, (count, 2, 2))) % K
    bottom = top.repeat(2, axis=1).repeat(2, axis=2)
    dtype = code_dtype(K)
    shards = [
        write_shard(
            TokenizeManifest.directory(output_dir),
            keys[part],
            labels[part],
            {"top": top[part].astype(dtype), "bottom": bottom[part].astype(dtype)},
        )
        for part in (slice(0, count // 2), slice(count // 2, count))
    ]
    counts = {
        s: sum(split_of(k, VALIDATION, TEST) == s for k in keys) for s in ("validation", "test")
    }
    return write_manifest(
        output_dir,
        tokenize_manifest(
            shards=shards,
            samples=count,
            splits={"train": count - sum(counts.values()), **counts},
            levels=["top", "bottom"],
            code_shapes={"top": [2, 2], "bottom": [4, 4]},
            code_dtypes={"top": dtype.name, "bottom": dtype.name},
            codebook_sizes={"top": K, "bottom": K},
        ),
    )


def tokenize_manifest(**fields) -> TokenizeManifest:
    """A tokenize manifest with the given fields; the rest as no test here reads them."""
    defaults = {
        "shards": [],
        "samples": 0,
        "splits": {},
        "code_dtypes": {},
        "class_names": CLASSES,
        "checkpoint": "unused",
        "tokenizer": TokenizerIdentity(checkpoint="unused", sha256="0" * 64),
        "corpus_name": "corpus",
        "validation_fraction": VALIDATION,
        "test_fraction": TEST,
        "image_size": [16, 16],
        "channels": 3,
        "bad_inputs": BadInputs(count=0, keys=[], table=""),
        "metrics": {},
        "fingerprint": "test",
    }
    return TokenizeManifest(**(defaults | fields))


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prior")
    raw = tiny_raw_config(str(tmp / "out"), str(tmp / "unused-corpus"))
    raw["data"] |= {"validation_fraction": VALIDATION, "test_fraction": TEST}
    # Both priors train on two DDP ranks (gradients, barriers and rank-0 evaluation together), in
    # one Ray Train run (they ask for the same workers). Each level's workers fail after its step
    # 2 (checkpointed), and the run restarts: a restarted level resumes from its own checkpoint,
    # never from the other level's, and a finished level is not trained again. (A rank that fails
    # while rank 0 still writes the step-2 checkpoint can end the attempt before Ray Train has
    # it: that attempt restarts from the checkpoint before, and fails at step 2 again. Hence the
    # failures allowed beyond the two injected.)
    for level in ("top", "bottom"):
        raw["train_prior"][level] |= {
            "num_workers": 2,
            "cpus_per_worker": 0.5,
            "fail_at_step": 2,
            "max_failures": 6,
        }
    # Priors of different kinds in one stage: the bottom one is a transformer, conditioned on the
    # top codes like any other kind.
    raw["train_prior"]["bottom"] |= {
        "kind": "transformer",
        "model": {"channels": 16, "num_layers": 1, "num_heads": 2, "dropout": 0.0},
    }
    # A learning rate at which the four steps learn some of the codes' structure.
    for level in ("top", "bottom"):
        raw["train_prior"][level]["lr"] = 1e-2
    cfg = parse_config(raw)
    tokenized = write_tokenized(cfg.output_dir)
    tracker = Tracker(f"sqlite:///{tmp}/mlflow.db", "test")
    with tracker.stage_run("train_prior") as tracking:
        ctx = StageContext(
            cfg, "train_prior", storage.join(cfg.output_dir, "train_prior"), "fp", tracking
        )
        manifest = train_prior.run(ctx)
    return cfg, tokenized, manifest, tracker.client, tracking.run_id


def heldout_codes(tokenized: TokenizeManifest) -> dict[str, np.ndarray]:
    samples = [
        s
        for s in iter_code_samples(sh.uri for sh in tokenized.shards)
        if split_of(s["key"], VALIDATION, TEST) == "validation"
    ]
    return {k: np.stack([s[k] for s in samples]) for k in ("top", "bottom", "label")}


def test_both_priors_train_and_their_checkpoints_load(trained):
    _, _, manifest, _, _ = trained
    assert manifest.levels == ["top", "bottom"]
    for level, kind, model_class in (
        ("top", "pixelsnail", "PixelSNAIL"),
        ("bottom", "transformer", "TransformerPrior"),
    ):
        prior = manifest.priors[level]
        assert prior.kind == kind and prior.steps == STEPS
        model, extra = load_checkpoint(prior.checkpoint)
        assert type(model).__name__ == model_class
        assert extra["level"] == level and extra["step"] == STEPS
        assert (model.config.num_codes, model.config.num_classes) == (K, len(CLASSES))
        for name in ("validation_bits_per_code", "train_bits_per_code"):
            value = getattr(prior, name)
            assert math.isfinite(value) and value > 0, name
        # A uniform prior costs log2 K = 4 bits per code; these codes carry less (the top map is
        # one of 4 codes per class, each bottom patch repeats its top code), and the trained
        # priors must have learnt some of that: worse than uniform, or barely better, fails.
        assert prior.validation_bits_per_code < math.log2(K) - 0.2


def test_bottom_prior_is_conditioned_on_the_top_codes(trained):
    _, _, manifest, _, _ = trained
    assert manifest.priors["top"].condition is None
    assert manifest.priors["bottom"].condition == "top"
    bottom, extra = load_checkpoint(manifest.priors["bottom"].checkpoint)
    assert extra["condition"] == "top"
    c = bottom.config
    assert (c.height, c.width) == (4, 4)
    assert (c.condition_num_codes, c.condition_height, c.condition_width) == (K, 2, 2)
    assert (c.num_layers, c.num_heads) == (1, 2)  # train_prior.bottom.model says so
    # The condition reaches the logits: another top map gives another distribution.
    codes = torch.zeros(1, 4, 4, dtype=torch.long)
    labels = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        a = bottom(codes, labels, torch.zeros(1, 2, 2, dtype=torch.long))
        b = bottom(codes, labels, torch.full((1, 2, 2), 5, dtype=torch.long))
    assert not torch.allclose(a, b)
    top, _ = load_checkpoint(manifest.priors["top"].checkpoint)
    assert top.config.condition_num_codes == 0


def test_validation_bits_per_code_is_the_models_loss_on_the_heldout_codes(trained):
    _, tokenized, manifest, _, _ = trained
    codes = heldout_codes(tokenized)
    assert 0 < len(codes["label"]) <= 8  # all of them fit the single held-out batch
    labels = torch.as_tensor(codes["label"]).long()
    top_codes = torch.as_tensor(codes["top"]).long()
    for level, condition in (("top", None), ("bottom", top_codes)):
        model, _ = load_checkpoint(manifest.priors[level].checkpoint)
        with torch.no_grad():
            bits = model.loss(torch.as_tensor(codes[level]).long(), labels, condition)
        assert manifest.priors[level].validation_bits_per_code == pytest.approx(
            float(bits), rel=1e-4
        )


def test_mlflow_has_per_level_metrics_and_checkpoints(trained):
    _, _, _, client, run_id = trained

    def steps(name: str) -> list[int]:
        return sorted(m.step for m in client.get_metric_history(run_id, name))

    for level in ("top", "bottom"):  # step 2 again where an attempt lost its step-2 checkpoint
        assert set(steps(f"{level}/validation_bits_per_code")) == {2, 4}
        assert set(steps(f"{level}/train_bits_per_code")) == {2, 4}
    names = {a.path for a in client.list_artifacts(run_id, "priors")}
    assert names == {"priors/top.pt", "priors/bottom.pt"}


def test_the_manifest_has_the_figures_of_the_selected_step(trained):
    _, _, manifest, client, run_id = trained
    for level, prior in manifest.priors.items():
        for name in ("validation_bits_per_code", "train_bits_per_code"):
            logged = {m.step: m.value for m in client.get_metric_history(run_id, f"{level}/{name}")}
            assert getattr(prior, name) == pytest.approx(logged[prior.selected_step]), name


def test_rerun_reuses_finished_priors(trained):
    cfg, _, manifest, client, _ = trained
    tracker = Tracker(client.tracking_uri, "test")
    with tracker.stage_run("train_prior") as tracking:
        ctx = StageContext(
            cfg, "train_prior", storage.join(cfg.output_dir, "train_prior"), "fp", tracking
        )
        again = train_prior.run(ctx)  # no Ray Train run: both checkpoints are there
    assert again == manifest


def test_levels_asking_for_the_same_workers_share_a_run_that_resumes_each_level(trained):
    cfg, _, manifest, client, run_id = trained
    assert sorted(os.listdir(os.path.join(cfg.output_dir, "train_prior", "ray"))) == [
        "train_prior-top-bottom-fp"
    ]

    def steps(name: str) -> list[int]:
        return sorted(m.step for m in client.get_metric_history(run_id, name))

    # The top prior fails after step 2; the restart resumes it there and finishes it. The bottom
    # prior starts afresh (the attempt's checkpoint is the top prior's) and fails after its step
    # 2; the next attempt skips the finished top prior and resumes the bottom one at step 2.
    assert set(steps("top/resumed_at_step")) == {2}
    assert set(steps("bottom/resumed_at_step")) == {2}
    # Each level's last step trained once: a level finished is not trained again.
    assert steps("top/train_bits_per_code").count(STEPS) == 1
    assert steps("bottom/train_bits_per_code").count(STEPS) == 1
    for level in ("top", "bottom"):
        assert manifest.priors[level].trained_steps == STEPS


@pytest.mark.parametrize(
    ("bottom", "groups"),
    [
        ({}, [["top", "bottom"]]),
        ({"num_workers": 2}, [["top"], ["bottom"]]),
        ({"cpus_per_worker": 2}, [["top"], ["bottom"]]),
        ({"max_failures": 5}, [["top"], ["bottom"]]),
        # Settings of the model and of its training do not split the run.
        (
            {"lr": 0.1, "steps": 9, "batch_size": 3, "kind": "pixelcnn", "model": {}},
            [["top", "bottom"]],
        ),
    ],
)
def test_levels_asking_for_the_same_workers_share_a_run(bottom, groups):
    raw = tiny_raw_config("out", "corpus")
    raw["train_prior"]["bottom"] |= bottom
    section = parse_config(raw).train_prior
    plans = train_prior.plan_priors_for(
        ["top", "bottom"], {"top": K, "bottom": K}, {"top": [2, 2], "bottom": [4, 4]}, section, 4
    )
    assert [[p.level for p in group] for group in train_prior.run_groups(plans)] == groups


# -------------------------------------------------------------------------------------------------
# Planning, without Ray


def one_level_manifest(num_codes: int = 32, class_names=("a", "b", "c")) -> TokenizeManifest:
    return tokenize_manifest(
        levels=["codes"],
        codebook_sizes={"codes": num_codes},
        code_shapes={"codes": [8, 8]},
        class_names=list(class_names),
    )


def test_one_level_model_gets_one_class_conditional_prior_from_the_codes_section():
    section = TrainPriorSection.model_validate(
        {
            "top": {"kind": "pixelsnail"},
            "codes": {"kind": "pixelcnn", "model": {"channels": 8, "num_layers": 2}},
        }
    )
    (plan,) = train_prior.plan_priors(one_level_manifest(), section)
    assert (plan.level, plan.condition, plan.model_name) == ("codes", None, "GatedPixelCNN")
    assert plan.model_config == {
        "channels": 8,
        "num_layers": 2,
        "num_codes": 32,
        "height": 8,
        "width": 8,
        "num_classes": 3,
    }


def test_a_single_class_corpus_gets_an_unconditional_prior():
    manifest = one_level_manifest(class_names=["only"])
    (plan,) = train_prior.plan_priors(manifest, TrainPriorSection())
    assert plan.model_config["num_classes"] == 0
