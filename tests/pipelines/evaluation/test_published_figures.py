"""Every figure the evaluate stage publishes for the shared run, recomputed independently.

Each figure of the evaluate manifest is recomputed here from the run's real inputs with a few lines
of numpy (tests/pipelines/independent.py): the corpus images on disk and its key-hash splits, the
code shards read with tarfile, the autoencoder and the priors loaded with vq_core, the sample PNGs,
the judge and the predictions table the stage writes. The published set of figures must be exactly
the recomputed set (plus the stage's own timing), so a figure that goes missing fails too.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines.evaluation.classifier import load_classifier
from tests.pipelines import independent as ind


@pytest.fixture(scope="module")
def run(shared_run):
    """What the figures are recomputed from: the config, manifests, corpus and its splits."""
    cfg, manifests = shared_run.cfg, shared_run.manifests
    images = ind.corpus_images(cfg.data.source)
    return cfg, manifests, images, ind.splits(images, cfg.data)


@pytest.fixture(scope="module")
def recomputed(run) -> dict[str, float]:
    """Every figure of the evaluate manifest, recomputed."""
    cfg, manifests, images, split = run
    return {
        **reconstruction(run),
        **codes_and_priors(run),
        **ind.cas_figures(
            ind.predictions(manifests["evaluate"].predictions),
            manifests["tokenize"].class_names,
            cfg.evaluate.bootstrap_samples,
        ),
        **cas_counts(run),
        **quality(run),
    }


def reconstruction(run) -> dict[str, float]:
    """MSE of the clipped reconstructions of every test image, on [-1, 1], and its PSNR."""
    cfg, manifests, images, split = run
    assert len(split["test"]) <= cfg.evaluate.holdout_batches * cfg.evaluate.batch_size
    autoencoder = ind.load_model(manifests["train_vqvae"].checkpoint)
    x = ind.to_input(np.stack([images[k].pixels for k in split["test"]]))
    with torch.no_grad():
        out = autoencoder.decode_codes(autoencoder.encode(x)).numpy().astype(np.float64)
    mse = float(np.mean((np.clip(out, -1, 1) - x.numpy().astype(np.float64)) ** 2))
    return {
        "test/mse": mse,
        "test/psnr": 10 * math.log10(1 / (mse / 4)),
        "test/images": len(split["test"]),
    }


def codes_and_priors(run) -> dict[str, float]:
    """Per level, the test codes' histogram figures and the prior's bits per code from its logits."""
    cfg, manifests, images, split = run
    tok, priors = manifests["tokenize"], manifests["train_prior"].priors
    stored = ind.shard_codes([s.uri for s in tok.shards], tok.levels)
    fractions = (tok.validation_fraction, tok.test_fraction)
    test = sorted(k for k in stored if ind.split_of(k, *fractions) == "test")
    assert test == split["test"]  # the shards' test split is the corpus' test split
    assert [stored[k]["label"] for k in test] == [images[k].label for k in test]
    codes = {level: np.stack([stored[k][level] for k in test]) for level in tok.levels}
    labels = torch.tensor([stored[k]["label"] for k in test])
    figures: dict[str, float] = {"test/code_maps": len(test)}
    for level in tok.levels:
        used, usage, perplexity = ind.histogram_figures(codes[level], tok.codebook_sizes[level])
        figures[f"test/codes_used/{level}"] = used
        figures[f"test/usage/{level}"] = usage
        figures[f"test/perplexity/{level}"] = perplexity
        prior = ind.load_model(priors[level].checkpoint)
        condition = priors[level].condition
        with torch.no_grad():
            logits = prior(
                torch.from_numpy(codes[level].astype(np.int64)),
                labels=labels if prior.config.num_classes > 0 else None,
                condition=torch.from_numpy(codes[condition].astype(np.int64))
                if condition
                else None,
            )
        figures[f"test/bits_per_code/{level}"] = ind.bits_per_code(logits.numpy(), codes[level])
    figures["test/bits_per_image"] = sum(
        figures[f"test/bits_per_code/{level}"] * math.prod(tok.code_shapes[level])
        for level in tok.levels
    )
    return figures


def sample_files(manifests) -> dict[str, int]:
    """The sample stage's PNGs and the class each was drawn for."""
    names = manifests["tokenize"].class_names
    return {
        os.path.join(entry.dir, f): names.index(name)
        for name, entry in manifests["sample"].classes.items()
        for f in sorted(os.listdir(entry.dir))
        if f.endswith(".png")
    }


def cas_counts(run) -> dict[str, float]:
    """How many images each CAS classifier saw, from the corpus splits and the sample folders."""
    cfg, manifests, images, split = run
    generated = sample_files(manifests)
    counts = np.bincount(list(generated.values()), minlength=len(manifests["tokenize"].class_names))
    train = [images[k].label for k in split["train"]]
    return {
        "cas/generated_images": len(generated),
        "cas/real_train_images": sum(min(c, train.count(y)) for y, c in enumerate(counts) if c),
        "cas/judge_train_images": len(train),
        "cas/classes": int((counts > 0).sum()),
    }


def quality(run) -> dict[str, float]:
    """FID, its real-image floor, precision and recall in the judge's penultimate layer."""
    cfg, manifests, images, split = run
    judge, _ = load_classifier(os.path.join(cfg.output_dir, "evaluate", "judge.pt"))
    generated = sample_files(manifests)

    def features(pixels: list[np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            return judge.embed(ind.to_input(np.stack(pixels))).double().numpy()

    real = features([images[k].pixels for k in split["test"]])
    fake = features([ind.read_png(f) for f in generated])
    counts = dict(zip(*np.unique(list(generated.values()), return_counts=True)))
    train = [(k, images[k].label) for k in split["train"]]
    matched = ind.matched_keys(train, counts, salt=cfg.sample.seed)
    precision, recall = ind.precision_recall(real, fake, cfg.evaluate.neighbours)
    return {
        "quality/fid": ind.frechet(fake, real),
        "quality/fid_real_train": ind.frechet(features([images[k].pixels for k in matched]), real),
        "quality/precision": precision,
        "quality/recall": recall,
    }


def test_every_published_figure_is_recomputed(shared_run, recomputed):
    published = dict(shared_run.manifests["evaluate"].metrics)
    seconds = published.pop("evaluate/seconds")
    assert 0 < seconds <= shared_run.manifests["evaluate"].seconds
    assert sorted(published) == sorted(recomputed)


@pytest.mark.parametrize(
    "family, rel, abs_",
    [
        ("test/", 1e-5, 1e-9),
        ("cas/", 1e-12, 1e-12),
        ("quality/", 1e-4, 1e-7),
    ],
)
def test_each_figure_matches_its_recomputation(shared_run, recomputed, family, rel, abs_):
    published = shared_run.manifests["evaluate"].metrics
    names = [k for k in recomputed if k.startswith(family)]
    assert names
    assert {k: published[k] for k in names} == pytest.approx(
        {k: recomputed[k] for k in names}, rel=rel, abs=abs_
    )


def test_every_level_has_its_figures(shared_run, recomputed):
    tok = shared_run.manifests["tokenize"]
    evaluate = shared_run.manifests["evaluate"]
    assert evaluate.levels == tok.levels == ["top", "bottom"]
    for level in evaluate.levels:
        for figure in ("codes_used", "usage", "perplexity", "bits_per_code"):
            assert f"test/{figure}/{level}" in recomputed
            assert f"test/{figure}/{level}" in evaluate.metrics


def test_predictions_are_the_judges_and_cover_the_real_inputs(run):
    """The predictions table the CAS figures are recomputed from is honest: its test rows are the
    test split, its generated rows the sample PNGs, and the saved judge makes its judge rows."""
    cfg, manifests, images, split = run
    table = ind.predictions(manifests["evaluate"].predictions)
    generated = sample_files(manifests)
    judge, _ = load_classifier(os.path.join(cfg.output_dir, "evaluate", "judge.pt"))
    for classifier in ("generated", "real", "judge"):
        index = ind.rows(table, classifier, "test")
        assert sorted(table["key"][index]) == split["test"], classifier
        assert [images[k].label for k in table["key"][index]] == list(table["label"][index])
    index = ind.rows(table, "judge", "generated", cfg.sample.seed)
    assert dict(zip(table["key"][index], table["label"][index])) == generated
    sampled = sorted(set(generated.values()))
    for kind, pixels in (
        ("test", [images[k].pixels for k in table["key"][ind.rows(table, "judge", "test")]]),
        ("generated", [ind.read_png(f) for f in table["key"][index]]),
    ):
        with torch.no_grad():
            logits = judge(ind.to_input(np.stack(pixels))).numpy()
        predicted = np.array(sampled)[logits[:, sampled].argmax(axis=1)]
        assert list(predicted) == list(table["predicted"][ind.rows(table, "judge", kind)]), kind
    assert len(table["key"]) == len(split["test"]) * 3 + len(generated)


def test_published_figures_and_predictions_are_in_mlflow(shared_run):
    cfg, evaluate = shared_run.cfg, shared_run.manifests["evaluate"]
    client = MlflowClient(tracking_uri="sqlite:///" + os.path.join(cfg.output_dir, "mlflow.db"))
    logged = client.get_run(evaluate.mlflow_run_id).data.metrics
    assert logged == pytest.approx(evaluate.metrics, rel=1e-12)
    path = client.download_artifacts(evaluate.mlflow_run_id, "predictions.parquet")
    with open(path, "rb") as a, open(evaluate.predictions, "rb") as b:
        assert a.read() == b.read()
