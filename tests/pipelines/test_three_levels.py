"""A three-level VQ-VAE-2 (levels top, middle, bottom) through the whole pipeline.

One real run of ``configs/demo-three-level.yaml``, shrunk as the other tiny tests are (32x32 images,
tiny models, a few steps): its shards hold one map per level, each level's prior is causal and
reads the class and the level directly above it, samples decode to images, ``vqpipe status`` names
every level and a second run skips every stage. Then the guards: sections and sampling settings of
levels the autoencoder lacks, and code shards of another depth, are refused naming both lists.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from jobs.cli import main as cli_main
from pipelines.config import ConfigError, parse_config
from pipelines.data.images import decode_image
from pipelines.data.shards import (
    CodeShards,
    ShardEntry,
    code_dataset,
    iter_code_samples,
    iter_manifest_samples,
    write_shard,
)
from pipelines.errors import InputError
from pipelines.runner import run_stages
from pipelines.stages import stage_names
from pipelines.status import format_status, pipeline_status
from tests.pipelines.conftest import tiny_raw_config
from vq_core.checkpoint import load_checkpoint
from vq_core.sampling import sample_levels

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["circle", "square", "triangle", "cross"]
PER_CLASS = 5
LEVELS = ["top", "middle", "bottom"]
SIZE = 32
# Level -> (codebook size, map side at 32x32): 2x2, 4x4 and 8x8 codes; the bottom's codebook is
# larger than 256, so its codes are stored as uint16 and the others as uint8.
CODES = {"top": (16, 2), "middle": (16, 4), "bottom": (300, 8)}


def three_level_raw(root: Path) -> dict:
    """configs/demo-three-level.yaml with the tiny test sizes, writing under ``root``."""
    shipped = yaml.safe_load((REPO / "configs" / "demo-three-level.yaml").read_text())
    tiny = tiny_raw_config(str(root / "out"), str(root / "corpus"))
    shipped_levels = shipped["train_vqvae"]["model"]["levels"]
    assert [spec["name"] for spec in shipped_levels] == LEVELS
    assert [spec["downsample"] for spec in shipped_levels] == [2, 2, 4]
    raw = {k: tiny[k] for k in ("output_dir", "seed", "tokenize", "evaluate")}
    raw["data"] = {
        **tiny["data"],
        "image_size": SIZE,
        "generate": {"images_per_class": PER_CLASS, "classes": CLASSES, "image_size": SIZE},
    }
    raw["mlflow"] = {"log_models": False}
    tiny_model = {k: v for k, v in tiny["train_vqvae"]["model"].items() if "codebook" not in k}
    levels = [{**spec, "codebook_size": CODES[spec["name"]][0]} for spec in shipped_levels]
    raw["train_vqvae"] = {**tiny["train_vqvae"], "model": {**tiny_model, "levels": levels}}
    prior = tiny["train_prior"]["bottom"]
    raw["train_prior"] = {
        # The top prior with attention; middle and bottom as the shipped config has them: without.
        "top": {**prior, "model": {**prior["model"], "attention": True, "num_heads": 2}},
        "middle": {**prior, "model": {k: v for k, v in prior["model"].items() if k != "attention"}},
        "bottom": prior,
    }
    raw["sample"] = {**tiny["sample"], "levels": {"middle": {"temperature": 0.5, "top_k": 4}}}
    raw["evaluate"] = {**tiny["evaluate"], "classifier_steps": 3}
    return raw


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory):
    """(config, manifests of the first run, outcomes of a second run)."""
    root = tmp_path_factory.mktemp("three-levels")
    cfg = parse_config(three_level_raw(root))
    first = run_stages(cfg, run_name="first")
    second = run_stages(cfg, run_name="second")
    return cfg, {name: outcome.manifest for name, outcome in first.items()}, second


# -------------------------------------------------------------------------------------------------
# The configuration


def test_the_config_has_a_prior_section_per_level_with_the_defaults_of_its_place(tmp_path):
    raw = three_level_raw(tmp_path)
    del raw["train_prior"]["middle"]  # unset: the defaults, below the top without attention
    cfg = parse_config(raw, ["train_prior.middle.steps=7", "train_prior.top.steps=5"])
    assert list(cfg.train_prior.sections()) == LEVELS
    assert cfg.code_levels() == tuple(LEVELS)
    assert (cfg.train_prior.top.steps, cfg.train_prior.for_level("middle").steps) == (5, 7)
    assert cfg.train_prior.for_level("middle").model == {"attention": False}
    assert cfg.train_prior.for_level("top").model["attention"] is True
    # As `vqpipe validate` prints it and runs log it, the config reads back the same.
    assert parse_config(cfg.model_dump(mode="json")) == cfg
    middle = {"temperature": 0.5, "top_k": 4, "top_p": None, "guidance": 1.0}
    assert cfg.sample.for_level("middle") == middle
    bottom = {"temperature": 1.0, "top_k": None, "top_p": None, "guidance": 1.0}
    assert cfg.sample.for_level("bottom") == bottom


def test_vqpipe_validate_shows_each_levels_section(capsys):
    assert (
        cli_main(["validate", str(REPO / "configs" / "demo-three-level.yaml"), "--no-memory"]) == 0
    )
    shown = json.loads(capsys.readouterr().out)
    assert list(shown["train_prior"]) == ["shards", *LEVELS]
    assert shown["train_prior"]["middle"]["model"]["attention"] is False
    assert shown["train_prior"]["top"]["model"]["attention"] is True
    assert shown["sample"]["levels"] == {
        "bottom": {"temperature": 1.0, "top_k": None, "top_p": None, "guidance": None}
    }
    assert [spec["name"] for spec in shown["train_vqvae"]["model"]["levels"]] == LEVELS


def test_sections_and_sampling_settings_of_other_levels_are_refused(tmp_path):
    raw = three_level_raw(tmp_path)
    raw["train_prior"]["codes"] = {"steps": 3}
    with pytest.raises(
        ConfigError,
        match=r"train_prior\.codes configures a prior for code level 'codes', but "
        r"train_vqvae\.model\.levels has levels \['top', 'middle', 'bottom'\]; configure "
        r"train_prior\.top, train_prior\.middle and train_prior\.bottom instead",
    ):
        parse_config(raw)
    raw = three_level_raw(tmp_path)
    raw["sample"]["levels"]["lowest"] = {"temperature": 0.5}
    with pytest.raises(ConfigError, match=r"sample\.levels\.lowest .* has levels \['top', 'mid"):
        parse_config(raw)
    # A level may not take the name of train_prior's own key.
    raw = three_level_raw(tmp_path)
    raw["train_vqvae"]["model"]["levels"][1]["name"] = "shards"
    del raw["train_prior"]["middle"]
    with pytest.raises(ConfigError, match=r"has a code level named 'shards', which is train_prior"):
        parse_config(raw)
    # The default two levels have no middle.
    with pytest.raises(ConfigError, match=r"train_prior\.middle .* has levels \['top', 'bottom'\]"):
        parse_config(
            {"output_dir": "o", "data": {"source": "s"}, "train_prior": {"middle": {"steps": 3}}}
        )


# -------------------------------------------------------------------------------------------------
# The run


def test_every_stage_ran_once_and_a_second_run_skips_them_all(run):
    cfg, manifests, second = run
    assert list(manifests) == list(stage_names())
    assert all(outcome.skipped for outcome in second.values()), {
        name: outcome.skipped for name, outcome in second.items()
    }
    for name, outcome in second.items():
        assert outcome.manifest.fingerprint == manifests[name].fingerprint, name
    assert manifests["train_vqvae"].levels == LEVELS
    assert manifests["train_vqvae"].code_shapes == {k: [s, s] for k, (_, s) in CODES.items()}


def test_the_shards_hold_one_map_per_level_in_its_dtype(run):
    _, manifests, _ = run
    tok = manifests["tokenize"]
    assert tok.levels == LEVELS
    assert tok.code_dtypes == {"top": "uint8", "middle": "uint8", "bottom": "uint16"}
    samples = list(iter_manifest_samples(tok))
    assert len(samples) == tok.samples == PER_CLASS * len(CLASSES)
    for sample in samples:
        assert sorted(k for k in sample if k in CODES) == sorted(LEVELS)
        for level, (k, side) in CODES.items():
            codes = sample[level]
            assert codes.shape == (side, side), level
            assert codes.dtype == np.dtype(tok.code_dtypes[level]), level
            assert int(codes.max()) < k, level
    # Every reader sees the three levels: the Ray Data reader as int64.
    row = code_dataset(tok, "all").take(1)[0]
    assert {level: row[level].shape for level in LEVELS} == {
        level: (side, side) for level, (_, side) in CODES.items()
    }
    assert all(row[level].dtype == np.int64 for level in LEVELS)


def test_each_prior_reads_the_class_and_the_level_above_and_is_causal(run):
    _, manifests, _ = run
    priors = manifests["train_prior"]
    assert priors.levels == LEVELS and list(priors.priors) == LEVELS
    conditions = {"top": None, "middle": "top", "bottom": "middle"}
    assert {level: entry.condition for level, entry in priors.priors.items()} == conditions
    generator = torch.Generator().manual_seed(0)
    for level, condition in conditions.items():
        model, extra = load_checkpoint(priors.priors[level].checkpoint)
        assert extra["level"] == level and extra["condition"] == condition
        c = model.config
        k, side = CODES[level]
        assert (c.num_codes, c.height, c.width, c.num_classes) == (k, side, side, len(CLASSES))
        assert c.attention is (level == "top")  # below the top: none, by default
        codes = torch.randint(0, k, (1, side, side), generator=generator)
        labels = torch.zeros(1, dtype=torch.long)
        above = None
        if condition is not None:
            ck, cside = CODES[condition]
            assert (c.condition_num_codes, c.condition_height) == (ck, cside)
            above = torch.randint(0, ck, (1, cside, cside), generator=generator)
        with torch.no_grad():
            logits = model(codes, labels, above)
            # The class reaches the logits.
            assert not torch.allclose(logits, model(codes, torch.ones_like(labels), above))
            if above is not None:
                # So does the level above: change one of its codes.
                other = above.clone()
                other[0, 0, 0] = (other[0, 0, 0] + 1) % CODES[condition][0]
                assert not torch.allclose(logits, model(codes, labels, other)), level
            # Causal: changing the last code of the map changes no logit before it; changing the
            # first changes only logits after it.
            later = codes.clone()
            later[0, -1, -1] = (later[0, -1, -1] + 1) % k
            changed = model(later, labels, above)
            flat, flat_changed = logits.flatten(2), changed.flatten(2)
            assert torch.equal(flat[..., :-1], flat_changed[..., :-1]), level
            first = codes.clone()
            first[0, 0, 0] = (first[0, 0, 0] + 1) % k
            moved = model(first, labels, above).flatten(2)
            assert torch.equal(flat[..., :1], moved[..., :1]), level
            assert not torch.allclose(flat[..., 1:], moved[..., 1:]), level


def test_samples_are_drawn_top_down_with_each_levels_settings_and_decode_to_images(run):
    cfg, manifests, _ = run
    sample = manifests["sample"]
    assert sample.levels == LEVELS and list(sample.priors) == LEVELS
    drawn = {level: s.model_dump() for level, s in sample.settings.levels.items()}
    assert drawn == {
        "top": {"temperature": 1.0, "top_k": None, "top_p": None, "guidance": 1.0},
        "middle": {"temperature": 0.5, "top_k": 4, "top_p": None, "guidance": 1.0},
        "bottom": {"temperature": 1.0, "top_k": None, "top_p": None, "guidance": 1.0},
    }
    for name, entry in sample.classes.items():
        pngs = sorted(f for f in os.listdir(entry.dir) if f.endswith(".png"))
        assert len(pngs) == cfg.sample.per_class, name
        image = decode_image(open(os.path.join(entry.dir, pngs[0]), "rb").read(), (SIZE, SIZE), 3)
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    # The same path by hand: three maps drawn top down, decoded once they are all drawn.
    autoencoder, _ = load_checkpoint(manifests["train_vqvae"].checkpoint)
    priors = [
        (level, entry.condition, load_checkpoint(entry.checkpoint)[0])
        for level, entry in manifests["train_prior"].priors.items()
    ]
    codes = sample_levels(
        priors,
        2,
        torch.tensor([0, 1]),
        settings={"middle": {"top_k": 1}},
        generator=torch.Generator().manual_seed(0),
    )
    assert {level: tuple(c.shape) for level, c in codes.items()} == {
        level: (2, side, side) for level, (_, side) in CODES.items()
    }
    images = autoencoder.decode_codes(tuple(codes[level] for level in LEVELS))
    assert images.shape == (2, 3, SIZE, SIZE)
    report = open(manifests["evaluate"].report).read()
    for level in LEVELS:  # the codebook and prior tables have a row per level
        assert f"| {level} | {CODES[level][0]} |" in report, level
    assert (
        "| middle | pixelsnail | top |" in report and "| bottom | pixelsnail | middle |" in report
    )
    assert "levels drawn with their own settings: middle temperature=0.5, top_k=4" in report


def test_status_names_every_level(run, capsys):
    cfg, manifests, _ = run
    statuses = {s.stage: s for s in pipeline_status(cfg)}
    assert {name: s.state for name, s in statuses.items()} == dict.fromkeys(stage_names(), "done")
    for stage in ("train_vqvae", "tokenize", "train_prior"):
        for level in LEVELS:
            assert level in statuses[stage].detail, (stage, level)
    assert "top 2x2, middle 4x4, bottom 8x8" in statuses["tokenize"].detail
    shown = format_status(list(statuses.values()))
    assert all(f"'{level}'" in shown for level in LEVELS)  # the priors' bits per code
    config = Path(cfg.output_dir).parent / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert cli_main(["status", str(config)]) == 0
    out = capsys.readouterr().out
    assert "middle" in out and out.count("done") == len(stage_names())


# -------------------------------------------------------------------------------------------------
# Code shards of another depth


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A three-level autoencoder's checkpoint as train_vqvae publishes it (untrained)."""
    from pipelines.checkpoint_meta import CheckpointMeta, save_with_meta
    from vq_core.kinds import get_kind

    raw = three_level_raw(tmp_path_factory.mktemp("checkpoint"))
    torch.manual_seed(0)
    model = get_kind("vqvae2").build(raw["train_vqvae"]["model"], {"in_channels": 3})
    assert model.levels == tuple(LEVELS)
    path = str(tmp_path_factory.mktemp("checkpoint") / "model.pt")
    meta = CheckpointMeta(kind="vqvae2", image_size=[SIZE, SIZE], channels=3, class_names=CLASSES)
    save_with_meta(model, path, meta)
    return path


def _two_level_shards(directory: Path) -> list[str]:
    """A shard holding two levels (top, bottom), as a two-level tokenizer writes them."""
    entry = write_shard(
        str(directory),
        ["circle/00000", "circle/00001"],
        [0, 0],
        {"top": np.zeros((2, 2, 2), np.uint8), "bottom": np.zeros((2, 8, 8), np.uint16)},
    )
    return [entry.uri]


def _manifest_of(shards: list[str]) -> CodeShards:
    """A set of code shards that says it holds the three levels."""
    return CodeShards(
        shards=[
            ShardEntry(name=u.rsplit("/", 1)[-1], uri=u, samples=2, bytes=os.path.getsize(u))
            for u in shards
        ],
        levels=LEVELS,
        code_shapes={level: [side, side] for level, (_, side) in CODES.items()},
        code_dtypes={"top": "uint8", "middle": "uint8", "bottom": "uint16"},
        validation_fraction=0.0,
        test_fraction=0.0,
    )


def test_vqpipe_decode_refuses_shards_of_another_depth(ray_local, checkpoint, tmp_path):
    from pipelines.tools.decode import decode_shards

    _two_level_shards(tmp_path / "two")
    # The three-level autoencoder and the two-level shards, both lists named.
    both = r"holds the code levels \['bottom', 'top'\], but the autoencoder has the levels " + (
        r"\['top', 'middle', 'bottom'\]"
    )
    with pytest.raises(InputError, match=both):
        decode_shards(checkpoint, str(tmp_path / "two"), str(tmp_path / "images"))
    assert not (tmp_path / "images").exists()
    # Shards that hold a level more than the autoencoder's are refused too.
    four = write_shard(
        str(tmp_path / "four"),
        ["circle/00000"],
        [0],
        {
            level: np.zeros((1, side, side), np.uint8)
            for level, side in (("top", 2), ("middle", 4), ("bottom", 8), ("finest", 16))
        },
    )
    with pytest.raises(InputError, match=r"\['bottom', 'finest', 'middle', 'top'\], but the auto"):
        decode_shards(checkpoint, four.uri, str(tmp_path / "images"))
    # Three levels of the right shapes decode.
    three = write_shard(
        str(tmp_path / "three"),
        ["circle/00000"],
        [0],
        {level: np.zeros((1, side, side), np.uint16) for level, (_, side) in CODES.items()},
    )
    summary = decode_shards(checkpoint, three.uri, str(tmp_path / "images"))
    assert summary["written"] == 1
    image = decode_image(
        (tmp_path / "images" / "circle" / "00000.png").read_bytes(), (SIZE, SIZE), 3
    )
    assert image.shape == (SIZE, SIZE, 3)


def test_code_shard_readers_refuse_shards_of_another_depth(ray_local, tmp_path):
    shards = _two_level_shards(tmp_path / "two")
    wrong = _manifest_of(shards)  # says three levels, holds two
    with pytest.raises(InputError, match=r"holds the code levels \['bottom', 'top'\], but its set"):
        list(iter_manifest_samples(wrong))
    with pytest.raises(InputError, match=r"\['top', 'middle', 'bottom'\]"):
        list(iter_code_samples(shards, LEVELS))
    with pytest.raises(Exception, match=r"holds the code levels \['bottom', 'top'\]"):
        code_dataset(wrong, "all").take_all()
    # Read as what they are, they are fine.
    two = wrong.model_copy(update={"levels": ["top", "bottom"]})
    assert len(list(iter_manifest_samples(two))) == 2


def test_train_prior_refuses_sections_of_levels_its_code_shards_lack(tmp_path):
    from pipelines.stages.train_prior import plan_priors_for

    cfg = parse_config(three_level_raw(tmp_path))
    levels = ["top", "bottom"]  # codes of a two-level tokenizer (train_prior.shards, say)
    with pytest.raises(
        ConfigError,
        match=r"train_prior\.middle configures a prior for code level 'middle', but the "
        r"tokenizer of the code shards has levels \['top', 'bottom'\]",
    ):
        plan_priors_for(
            levels,
            {"top": 16, "bottom": 16},
            {"top": [2, 2], "bottom": [8, 8]},
            cfg.train_prior,
            4,
            source="the tokenizer of the code shards",
        )
    plans = plan_priors_for(
        LEVELS,
        {level: k for level, (k, _) in CODES.items()},
        {level: [side, side] for level, (_, side) in CODES.items()},
        cfg.train_prior,
        4,
    )
    assert [(p.level, p.condition) for p in plans] == [
        ("top", None),
        ("middle", "top"),
        ("bottom", "middle"),
    ]
    middle = plans[1].model_config
    assert (middle["condition_num_codes"], middle["condition_height"]) == (16, 2)
    assert middle["attention"] is False


def test_sampling_refuses_an_autoencoder_of_other_levels(checkpoint):
    from pipelines.generation import check_autoencoder_levels
    from pipelines.tokenizer import TokenizerIdentity

    data = Path(checkpoint).read_bytes()
    identity = TokenizerIdentity(checkpoint=checkpoint, sha256="0" * 64)
    check_autoencoder_levels(data, SimpleNamespace(levels=LEVELS, tokenizer=identity))
    with pytest.raises(
        InputError,
        match=r"the priors draw code levels \['top', 'bottom'\], but the autoencoder .* has "
        r"levels \['top', 'middle', 'bottom'\]",
    ):
        check_autoencoder_levels(
            data, SimpleNamespace(levels=["top", "bottom"], tokenizer=identity)
        )


def test_a_pinned_tokenizer_refuses_sections_of_levels_it_lacks_before_anything_runs(
    checkpoint, tmp_path
):
    raw = three_level_raw(tmp_path)
    raw["tokenize"] = {**raw["tokenize"], "checkpoint": checkpoint}
    raw["train_prior"]["codes"] = {"steps": 3}
    cfg = parse_config(raw)  # its levels are in the checkpoint, read when the stages start
    with pytest.raises(
        ConfigError, match=r"train_prior\.codes .* the pinned tokenizer .* has levels \['top', 'm"
    ):
        run_stages(cfg, stages=["tokenize", "train_prior"])
    assert not os.path.exists(cfg.output_dir)
