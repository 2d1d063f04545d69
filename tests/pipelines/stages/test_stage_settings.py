"""Every user setting of sample and evaluate changes what it should, and nothing upstream.

Through the real runner on the shared run (tests/conftest.py): the shared config with
one setting overridden (as ``--set`` does), the sample or evaluate stage re-run, its outputs read,
then the stage folders put back. Re-running with the original settings gives the shared run's
images and figures byte for byte, so every difference below is the setting's doing.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from pipelines import console
from pipelines.config import parse_config
from pipelines.errors import ConfigError
from pipelines.evaluation.classifier import load_classifier
from pipelines.manifest import read_manifest
from pipelines.runner import run_stages
from pipelines.stages import STAGES
from tests.pipelines import independent as ind
from tests.pipelines.conftest import digests, restored

UPSTREAM = ("train_vqvae", "tokenize", "train_prior")
MANIFESTS = {spec.name: spec.manifest for spec in STAGES}

# name: (overrides, stages re-run). Sample settings re-run sample alone (evaluate would only
# measure the new images); evaluate settings re-run evaluate alone, on the shared run's samples.
RERUNS = {
    "original": ([], ["sample", "evaluate"]),
    "temperature": (["sample.temperature=0.5"], ["sample"]),
    "top_k": (["sample.top_k=1"], ["sample"]),
    "top_p": (["sample.top_p=0.01"], ["sample"]),
    "keep_fraction": (["sample.rejection.keep_fraction=1.0"], ["sample"]),
    "per_class": (["sample.per_class=3"], ["sample"]),
    "seed": (["sample.seed=1"], ["sample"]),
    "top_temperature": (["sample.levels.top.temperature=0.5"], ["sample"]),
    "bottom_temperature": (["sample.levels.bottom.temperature=0.5"], ["sample"]),
    "both_temperatures": (
        ["sample.levels.top.temperature=0.5", "sample.levels.bottom.temperature=0.5"],
        ["sample"],
    ),
    "bottom_top_k": (["sample.levels.bottom.top_k=1"], ["sample"]),
    "top_guidance": (["sample.levels.top.guidance=3.0"], ["sample"]),
    "seeds": (["evaluate.seeds=2"], ["evaluate"]),
    "neighbours": (["evaluate.neighbours=1"], ["evaluate"]),
    "max_images": (["evaluate.max_images=3"], ["evaluate"]),
    "batch_size": (["evaluate.batch_size=2"], ["evaluate"]),
    "bootstrap_samples": (["evaluate.bootstrap_samples=200"], ["evaluate"]),
    "classifier_steps": (["evaluate.classifier_steps=2"], ["evaluate"]),
}


def sample_images(output_dir: str) -> dict[str, bytes]:
    """Every kept sample PNG (not the grids) by <class>/<file>."""
    root = os.path.join(output_dir, "sample")
    images = {}
    for name in sorted(os.listdir(root)):
        if os.path.isdir(os.path.join(root, name)):
            for file in sorted(os.listdir(os.path.join(root, name))):
                with open(os.path.join(root, name, file), "rb") as f:
                    images[f"{name}/{file}"] = f.read()
    return images


def drawn_by_evaluate(folder: str) -> dict[str, bytes]:
    """The PNGs evaluate drew for further sampling seeds, by samples-<seed>/<class>/<file>."""
    found = {}
    for name in digests(folder):
        if name.startswith("samples-") and name.endswith(".png") and name.count("/") == 2:
            with open(os.path.join(folder, name), "rb") as f:
                found[name] = f.read()
    return found


@dataclass
class Rerun:
    cfg: object
    outcomes: dict
    images: dict[str, bytes]
    manifests: dict  # every stage's manifest on disk after the re-run
    table: dict[str, np.ndarray]
    evaluate_files: set[str]
    judge: bytes
    drawn_by_evaluate: dict[str, bytes]  # evaluate/samples-<seed>/<class>/<file>.png
    console: str  # what the re-run printed to a console that is not a terminal

    @property
    def metrics(self) -> dict[str, float]:
        return {
            k: v for k, v in self.manifests["evaluate"].metrics.items() if k != "evaluate/seconds"
        }


class Reruns:
    """Each re-run of RERUNS once, on first use, with the stage folders restored afterwards."""

    def __init__(self, shared_run):
        self.shared = shared_run
        self.done: dict[str, Rerun] = {}
        with open(os.path.join(shared_run.cfg.output_dir, "evaluate", "judge.pt"), "rb") as f:
            self.judge_of_shared_run = f.read()

    def __getitem__(self, name: str) -> Rerun:
        if name not in self.done:
            overrides, stages = RERUNS[name]
            shared = self.shared
            cfg = parse_config(shared.raw_config(shared.cfg.output_dir), overrides)
            out = cfg.output_dir
            with restored(shared, ["sample", "evaluate"]):
                force = stages if not overrides else ()
                shown = io.StringIO()
                with console.active(console.Console(shown, live=False)):
                    outcomes = run_stages(cfg, stages, force=force, run_name=f"setting-{name}")
                manifests = {stage: read_manifest(out, MANIFESTS[stage]) for stage in MANIFESTS}
                with open(os.path.join(out, "evaluate", "judge.pt"), "rb") as f:
                    judge = f.read()
                self.done[name] = Rerun(
                    cfg,
                    outcomes,
                    sample_images(out),
                    manifests,
                    ind.predictions(manifests["evaluate"].predictions),
                    set(digests(os.path.join(out, "evaluate"))),
                    judge,
                    drawn_by_evaluate(os.path.join(out, "evaluate")),
                    shown.getvalue(),
                )
        return self.done[name]


@pytest.fixture(scope="module")
def upstream_before(shared_run):
    return {stage: digests(os.path.join(shared_run.cfg.output_dir, stage)) for stage in UPSTREAM}


@pytest.fixture(scope="module")
def reruns(shared_run, upstream_before) -> Reruns:
    return Reruns(shared_run)


@pytest.fixture(scope="module")
def shared_images(shared_run) -> dict[str, bytes]:
    return sample_images(shared_run.cfg.output_dir)


def shared_metrics(shared_run) -> dict[str, float]:
    metrics = shared_run.manifests["evaluate"].metrics
    return {k: v for k, v in metrics.items() if k != "evaluate/seconds"}


def pixels(images: dict[str, bytes], tmp_path) -> dict[str, np.ndarray]:
    out = {}
    for name, data in images.items():
        path = tmp_path / name.replace("/", "-")
        path.write_bytes(data)
        out[name] = ind.read_png(str(path))
    return out


def by_class(images: dict[str, bytes]) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    for name, data in sorted(images.items()):
        out.setdefault(name.split("/")[0], []).append(data)
    return out


# ------------------------------------------------------------------------------------------------


def test_the_original_settings_reproduce_the_shared_run(shared_run, reruns, shared_images):
    again = reruns["original"]
    assert parse_config(shared_run.raw_config(shared_run.cfg.output_dir)) == shared_run.cfg
    assert not again.outcomes["sample"].skipped and not again.outcomes["evaluate"].skipped
    assert again.images == shared_images
    assert len(shared_images) == 4 * shared_run.cfg.sample.per_class
    assert again.metrics == shared_metrics(shared_run)
    table = ind.predictions(shared_run.manifests["evaluate"].predictions)
    assert {k: list(v) for k, v in again.table.items()} == {k: list(v) for k, v in table.items()}
    assert again.judge == reruns.judge_of_shared_run
    for stage in ("sample", "evaluate"):
        assert again.manifests[stage].mlflow_run_id != shared_run.manifests[stage].mlflow_run_id


@pytest.mark.parametrize(
    "name, setting, value",
    [
        ("temperature", "temperature", 0.5),
        ("top_k", "top_k", 1),
        ("top_p", "top_p", 0.01),
        ("seed", "seed", 1),
    ],
)
def test_a_sampling_setting_changes_every_class_images(
    shared_run, reruns, shared_images, name, setting, value
):
    rerun = reruns[name]
    assert getattr(rerun.manifests["sample"].settings, setting) == value
    assert rerun.outcomes["sample"].manifest == rerun.manifests["sample"]
    assert set(rerun.images) == set(shared_images)  # as many images, other pixels
    changed, same = by_class(rerun.images), by_class(shared_images)
    for name_ in changed:
        assert changed[name_] != same[name_], name_
    # Not the same draws picked differently (rejection's classifier is seeded by sample.seed
    # too): no image is one of the shared run's.
    assert not set(rerun.images.values()) & set(shared_images.values())


@pytest.mark.parametrize("name", ["top_k", "top_p"])
def test_greedy_filtering_draws_one_image_per_class(reruns, name):
    """top_k 1, or a top_p below every second-best probability, leaves one code per position at
    every level: every draw of a class is the same image, and the two settings agree."""
    images = by_class(reruns[name].images)
    for name_, pngs in images.items():
        assert len(set(pngs)) == 1, name_
    assert reruns[name].images == reruns["top_k"].images


def test_keep_fraction_sets_the_draws(shared_run, reruns, shared_images):
    rerun = reruns["keep_fraction"]
    per_class = shared_run.cfg.sample.per_class
    assert shared_run.manifests["sample"].settings.draws_per_class == 2 * per_class
    assert rerun.manifests["sample"].settings.draws_per_class == per_class
    for entry in rerun.manifests["sample"].classes.values():
        assert entry.drawn == per_class and entry.rejection.acceptance_rate == 1.0
    assert set(rerun.images) == set(shared_images)
    assert rerun.images != shared_images


def test_per_class_sets_the_number_of_images(shared_run, reruns):
    rerun = reruns["per_class"]
    counts = {name: len(pngs) for name, pngs in by_class(rerun.images).items()}
    assert counts == {name: 3 for name in shared_run.manifests["tokenize"].class_names}
    assert rerun.manifests["sample"].samples == 12
    assert rerun.manifests["sample"].settings.draws_per_class == 6  # keep_fraction 0.5


def test_a_level_setting_reaches_that_level_only(shared_run, reruns, shared_images):
    """A per-level temperature changes the images, differently for each level; setting it on
    every level is the same as setting the stage's temperature."""
    top, bottom = reruns["top_temperature"], reruns["bottom_temperature"]
    distinct = [shared_images, top.images, bottom.images, reruns["temperature"].images]
    assert len({tuple(sorted(i.items())) for i in distinct}) == 4
    assert reruns["both_temperatures"].images == reruns["temperature"].images
    for rerun, expected in (
        (top, {"top": 0.5, "bottom": 1.0}),
        (bottom, {"top": 1.0, "bottom": 0.5}),
    ):
        levels = rerun.manifests["sample"].settings.levels
        assert {level: s.temperature for level, s in levels.items()} == expected


def test_a_level_filter_changes_the_images_but_not_as_the_stages_filter(reruns, shared_images):
    rerun = reruns["bottom_top_k"]
    assert rerun.images != shared_images
    assert rerun.images != reruns["top_k"].images  # not greedy at both levels
    settings = rerun.manifests["sample"].settings.levels
    assert (settings["bottom"].top_k, settings["top"].top_k) == (1, None)


def test_guidance_changes_the_images_of_the_level_trained_for_it(reruns, shared_images):
    """The shared run's top prior was trained with label dropout: guiding its draws changes every
    class's images, and the manifest says which level was guided."""
    rerun = reruns["top_guidance"]
    levels = rerun.manifests["sample"].settings.levels
    assert {level: s.guidance for level, s in levels.items()} == {"top": 3.0, "bottom": 1.0}
    assert rerun.manifests["sample"].settings.guidance == 1.0  # the stage's own setting
    assert set(rerun.images) == set(shared_images)
    changed, same = by_class(rerun.images), by_class(shared_images)
    for name_ in changed:
        assert changed[name_] != same[name_], name_


def test_guiding_a_prior_trained_without_label_dropout_is_refused_first(shared_run):
    """The bottom prior has no "no class" label: sample.guidance (every level) is refused before
    anything is drawn, naming the setting, the level and the fix, and the samples stay."""
    out = shared_run.cfg.output_dir
    cfg = parse_config(shared_run.raw_config(out), ["sample.guidance=2.0"])
    before = digests(os.path.join(out, "sample"))
    with pytest.raises(
        ConfigError,
        match=r"sample\.guidance=2\.0 needs the bottom prior to be trained with label dropout, "
        r"but it was trained with label_dropout=0\.0 .*train_prior\.bottom\.model\.label_dropout",
    ):
        run_stages(cfg, ["sample"], run_name="refused-guidance")
    assert digests(os.path.join(out, "sample")) == before


# ------------------------------------------------------------------------------------------------
# evaluate settings: other figures, the same samples


def evaluate_reruns():
    return [name for name, (_, stages) in RERUNS.items() if stages == ["evaluate"]]


@pytest.mark.parametrize("name", evaluate_reruns())
def test_an_evaluate_setting_leaves_the_samples_alone(shared_run, reruns, shared_images, name):
    rerun = reruns[name]
    assert rerun.images == shared_images
    assert list(rerun.outcomes) == ["evaluate"]
    assert rerun.manifests["sample"] == shared_run.manifests["sample"]
    assert (
        rerun.manifests["evaluate"].mlflow_run_id != shared_run.manifests["evaluate"].mlflow_run_id
    )


def unchanged(rerun: Rerun, shared_run, prefixes: tuple[str, ...]) -> None:
    """The figures under ``prefixes`` are the shared run's."""
    ours = {k: v for k, v in rerun.metrics.items() if k.startswith(prefixes)}
    theirs = {k: v for k, v in shared_metrics(shared_run).items() if k.startswith(prefixes)}
    assert ours == theirs and ours


def test_seeds_repeat_cas_over_more_samples(shared_run, reruns, shared_images):
    rerun = reruns["seeds"]
    seed = shared_run.cfg.sample.seed
    assert rerun.metrics["cas/seeds"] == 2
    # Its console names the stage and the seed it draws for, not the sample stage.
    bars = re.findall(r"^  (\S.*?)  images \d+/(\d+) \(100%\)", rerun.console, re.MULTILINE)
    # (the draws: 4 classes x per_class 2, each kept one of 1 / keep_fraction 0.5 = 2)
    assert bars == [(f"evaluate seed {seed + 1}", "16")], rerun.console
    assert {int(s) for s in rerun.table["sampling_seed"] if s is not None} == {seed, seed + 1}
    drawn = {f for f in rerun.drawn_by_evaluate if f.startswith(f"samples-{seed + 1}/")}
    assert len(drawn) == len(rerun.drawn_by_evaluate) == 8
    # Other draws, picked by the same rejection classifier: no image is one of the shared run's.
    assert not set(rerun.drawn_by_evaluate.values()) & set(shared_images.values())
    # The second seed's CAS classifier and judge rows are about the images drawn here.
    judged = rerun.table["key"][ind.rows(rerun.table, "judge", "generated", seed + 1)]
    folder = os.path.join(rerun.cfg.output_dir, "evaluate")
    assert sorted(os.path.relpath(k, folder) for k in judged) == sorted(drawn)
    recomputed = ind.cas_figures(
        rerun.table,
        shared_run.manifests["tokenize"].class_names,
        rerun.cfg.evaluate.bootstrap_samples,
    )
    published = {k: v for k, v in rerun.metrics.items() if k in recomputed}
    assert published == pytest.approx(recomputed, rel=1e-12, abs=1e-12)
    for name in ("cas/generated_to_real", "cas/real_to_real", "cas/real_to_generated"):
        assert {f"{name}/std", f"{name}/min", f"{name}/max"} <= set(recomputed)
    for name in ("quality/fid", "quality/fid_real_train", "quality/precision", "quality/recall"):
        spread = [rerun.metrics[f"{name}/{stat}"] for stat in ("min", "max", "std")]
        assert spread[0] <= rerun.metrics[name] <= spread[1] and spread[2] >= 0
    unchanged(rerun, shared_run, ("test/",))


def test_neighbours_set_the_manifolds_of_precision_and_recall(shared_run, reruns, tmp_path):
    rerun = reruns["neighbours"]
    path = tmp_path / "judge.pt"
    path.write_bytes(rerun.judge)
    judge, _ = load_classifier(str(path))
    images = ind.corpus_images(rerun.cfg.data.source)
    test = [images[k].pixels for k in rerun.table["key"][ind.rows(rerun.table, "judge", "test")]]
    generated = rerun.table["key"][ind.rows(rerun.table, "judge", "generated")]
    with torch.no_grad():
        real = judge.embed(ind.to_input(np.stack(test))).double().numpy()
        fake = judge.embed(ind.to_input(np.stack([ind.read_png(f) for f in generated])))
    precision, recall = ind.precision_recall(real, fake.double().numpy(), k=1)
    assert (rerun.metrics["quality/precision"], rerun.metrics["quality/recall"]) == (
        precision,
        recall,
    )
    assert (precision, recall) != ind.precision_recall(real, fake.double().numpy(), k=3)
    unchanged(rerun, shared_run, ("test/", "cas/", "quality/fid"))


def test_max_images_caps_the_real_images(shared_run, reruns):
    rerun = reruns["max_images"]
    assert rerun.metrics["cas/real_test_images"] == 3
    assert rerun.metrics["cas/judge_train_images"] == 3
    images = ind.corpus_images(rerun.cfg.data.source)
    test = ind.splits(images, rerun.cfg.data)["test"]
    smallest = sorted(test, key=lambda k: hashlib.blake2b(k.encode(), digest_size=8).digest())[:3]
    assert sorted(rerun.table["key"][ind.rows(rerun.table, "judge", "test")]) == sorted(smallest)
    unchanged(rerun, shared_run, ("test/",))


def test_batch_size_sets_the_reconstruction_and_prior_batches(shared_run, reruns):
    """With holdout_batches 1, a batch of 2 measures the reconstructions and the priors on 2 test
    images only; codebook usage still covers every test code, and CAS is untouched."""
    rerun = reruns["batch_size"]
    assert rerun.metrics["test/images"] == 2
    assert rerun.metrics["test/mse"] != shared_metrics(shared_run)["test/mse"]
    for level in ("top", "bottom"):
        key = f"test/bits_per_code/{level}"
        assert rerun.metrics[key] != shared_metrics(shared_run)[key]
    unchanged(rerun, shared_run, ("cas/", "quality/", "test/usage", "test/perplexity"))


def test_bootstrap_samples_set_the_intervals(shared_run, reruns):
    rerun = reruns["bootstrap_samples"]
    recomputed = ind.cas_figures(rerun.table, shared_run.manifests["tokenize"].class_names, 200)
    intervals = {k: v for k, v in recomputed.items() if "/ci_" in k}
    assert intervals
    assert {k: rerun.metrics[k] for k in intervals} == pytest.approx(intervals, rel=1e-12)
    thousand = ind.cas_figures(rerun.table, shared_run.manifests["tokenize"].class_names, 1000)
    assert {k: thousand[k] for k in intervals} == pytest.approx(
        {k: shared_metrics(shared_run)[k] for k in intervals}, rel=1e-12
    )
    others = {k: v for k, v in rerun.metrics.items() if "/ci_" not in k}
    assert others == {k: v for k, v in shared_metrics(shared_run).items() if "/ci_" not in k}


def test_classifier_steps_change_the_classifiers(shared_run, reruns):
    rerun = reruns["classifier_steps"]
    assert rerun.judge != reruns.judge_of_shared_run
    assert rerun.metrics["quality/fid"] != shared_metrics(shared_run)["quality/fid"]
    recomputed = ind.cas_figures(
        rerun.table,
        shared_run.manifests["tokenize"].class_names,
        rerun.cfg.evaluate.bootstrap_samples,
    )
    assert {k: rerun.metrics[k] for k in recomputed} == pytest.approx(recomputed, rel=1e-12)
    unchanged(rerun, shared_run, ("test/",))


def test_nothing_upstream_changed(shared_run, reruns, upstream_before):
    """Last: after every re-run above, the upstream folders are byte for byte as they were and
    their manifests name the shared run's MLflow runs."""
    for name in RERUNS:
        rerun = reruns[name]
        for stage in UPSTREAM:
            assert rerun.manifests[stage] == shared_run.manifests[stage], (name, stage)
            assert stage not in rerun.outcomes
    after = {stage: digests(os.path.join(shared_run.cfg.output_dir, stage)) for stage in UPSTREAM}
    assert after == upstream_before
