"""The sample stage on untrained tiny models: files per class, determinism, rejection, errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from pipelines import generation
from pipelines.config import PipelineConfig
from pipelines.data import storage
from pipelines.data.images import to_model_input
from pipelines.evaluation.classifier import load_classifier, predict_proba
from pipelines.manifest import write_manifest
from pipelines.stage import StageContext
from pipelines.stage_manifests import PriorEntry, TrainPriorManifest, TrainVQVAEManifest
from pipelines.stages import sample
from pipelines.tokenizer import TokenizerIdentity, sha256_of
from pipelines.tracking import Tracker, TrackingContext

CLASSES = ["circle", "cross", "square", "triangle"]  # sorted, as a folder corpus names them


def write_upstream(cfg: PipelineConfig, single_level: bool = False) -> None:
    """Untrained tiny autoencoder and priors, saved with their manifests as the upstream stages would."""
    from vq_core.checkpoint import save_checkpoint
    from vq_core.pixelsnail import PixelSNAIL, PixelSNAILConfig
    from vq_core.vqvae import VQVAE, VQVAE2, VQVAE2Config, VQVAEConfig

    torch.manual_seed(0)
    height, width = cfg.data.size_hw
    net = {"channels": 16, "res_blocks": 1, "res_channels": 8, "embed_dim": 8}
    if single_level:
        model, kind = VQVAE(VQVAEConfig(codebook_size=16, **net)), "vqvae"
    else:
        model = VQVAE2(VQVAE2Config(codebook_size_top=16, codebook_size_bottom=16, **net))
        kind = "vqvae2"
    levels = list(model.levels)
    shapes = dict(zip(levels, model.code_shape(height, width)))
    vq_dir = storage.join(cfg.output_dir, "train_vqvae")
    os.makedirs(vq_dir, exist_ok=True)
    save_checkpoint(model, os.path.join(vq_dir, "model.pt"))
    manifest = TrainVQVAEManifest.for_model(
        model,
        checkpoint=os.path.join(vq_dir, "model.pt"),
        kind=kind,
        image_size=(height, width),
        channels=cfg.data.channels,
        class_names=CLASSES,
    )
    write_manifest(cfg.output_dir, manifest)
    prior_dir = storage.join(cfg.output_dir, "train_prior")
    os.makedirs(prior_dir, exist_ok=True)
    priors = {}
    for i, level in enumerate(levels):
        condition = levels[i - 1] if i else None
        h, w = shapes[level]
        extra = {}
        if condition:
            ch, cw = shapes[condition]
            extra = {"condition_num_codes": 16, "condition_height": ch, "condition_width": cw}
        prior = PixelSNAIL(
            PixelSNAILConfig(
                num_codes=16,
                height=h,
                width=w,
                channels=16,
                num_blocks=1,
                res_blocks=1,
                num_heads=2,
                attention_channels=16,
                attention=condition is None,
                dropout=0.0,
                num_classes=len(CLASSES),
                condition_channels=8,
                condition_res_blocks=1,
                **extra,
            )
        )
        path = os.path.join(prior_dir, f"{level}.pt")
        save_checkpoint(prior, path)
        priors[level] = prior_entry(path, condition)
    write_manifest(
        cfg.output_dir,
        TrainPriorManifest(
            levels=levels,
            priors=priors,
            tokenizer=TokenizerIdentity(
                checkpoint=manifest.checkpoint,
                sha256=sha256_of(storage.read_bytes(manifest.checkpoint)),
            ),
            image_size=[height, width],
            channels=cfg.data.channels,
            class_names=CLASSES,
            corpora=[],
        ),
    )


def prior_entry(checkpoint: str, condition: str | None) -> PriorEntry:
    """A train_prior manifest entry for an untrained prior (about log2 16 = 4 bits per code)."""
    return PriorEntry(
        checkpoint=checkpoint,
        kind="pixelsnail",
        condition=condition,
        validation_bits_per_code=4.0,
        train_bits_per_code=4.0,
        steps=0,
        selected_step=0,
    )


def make_context(
    cfg: PipelineConfig, stage_dir: str | None = None, tracking: TrackingContext | None = None
) -> StageContext:
    return StageContext(
        cfg=cfg,
        stage="sample",
        stage_dir=stage_dir or storage.join(cfg.output_dir, "sample"),
        fingerprint="test",
        tracking=tracking or TrackingContext("sqlite://", None),
    )


def png_files(directory: str) -> list[str]:
    return sorted(f for f in os.listdir(directory) if f.endswith(".png"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    from pipelines.data.demo_data import generate_corpus

    root = str(tmp_path_factory.mktemp("corpus") / "shapes")
    generate_corpus(root, classes=CLASSES, images_per_class=10, image_size=16, seed=1)
    return root


def test_samples_per_class_grids_and_mlflow(ray_local, corpus, tiny_config, tmp_path):
    cfg = tiny_config(
        corpus, ["sample.per_class=3", "sample.batch_size=2", "sample.classes=[square, circle]"]
    )
    write_upstream(cfg)
    tracker = Tracker("sqlite:///" + str(tmp_path / "mlflow.db"), "test-sample")
    with tracker.stage_run("sample") as tracking:
        manifest = sample.run(make_context(cfg, tracking=tracking))

    assert list(manifest.classes) == ["square", "circle"]
    assert manifest.samples == 6
    for name, entry in manifest.classes.items():
        files = png_files(entry.dir)
        assert files == ["00000.png", "00001.png", "00002.png"], name
        for f in files:
            image = np.asarray(Image.open(os.path.join(entry.dir, f)))
            assert image.shape == (16, 16, 3) and image.dtype == np.uint8
        assert os.path.isfile(entry.grid)
        assert entry.grid == os.path.join(
            storage.join(cfg.output_dir, "sample"), f"grid-{name}.png"
        )
    assert not os.path.exists(os.path.join(storage.join(cfg.output_dir, "sample"), "triangle"))
    artifacts = {
        a.path
        for a in MlflowClient(tracker.tracking_uri).list_artifacts(tracking.run_id, "samples")
    }
    assert artifacts == {"samples/grid-square.png", "samples/grid-circle.png"}


def test_seeded_rerun_gives_identical_images_whatever_the_worker_count(
    ray_local, corpus, tiny_config, tmp_path
):
    cfg = tiny_config(
        corpus, ["sample.per_class=3", "sample.batch_size=2", "sample.classes=[cross]"]
    )
    write_upstream(cfg)
    first = sample.run(make_context(cfg, str(tmp_path / "a")))
    two_workers = tiny_config(
        corpus,
        [
            "sample.per_class=3",
            "sample.batch_size=2",
            "sample.classes=[cross]",
            "sample.num_workers=2",
            "sample.cpus_per_worker=0.5",
        ],
    )
    second = sample.run(make_context(two_workers, str(tmp_path / "b")))
    a, b = first.classes["cross"].dir, second.classes["cross"].dir
    assert png_files(a) == png_files(b) and len(png_files(a)) == 3
    for f in png_files(a):
        with open(os.path.join(a, f), "rb") as fa, open(os.path.join(b, f), "rb") as fb:
            assert fa.read() == fb.read(), f
    # Another seed draws other images.
    other = tiny_config(
        corpus,
        ["sample.per_class=3", "sample.batch_size=2", "sample.classes=[cross]", "sample.seed=7"],
    )
    third = sample.run(make_context(other, str(tmp_path / "c")))
    c = third.classes["cross"].dir
    assert any(
        open(os.path.join(a, f), "rb").read() != open(os.path.join(c, f), "rb").read()
        for f in png_files(a)
    )


def test_unknown_class_is_named_with_the_valid_ones(ray_local, corpus, tiny_config):
    cfg = tiny_config(corpus, ["sample.classes=[circle, hexagon]"])
    write_upstream(cfg)
    with pytest.raises(ValueError, match="hexagon") as err:
        sample.run(make_context(cfg))
    for name in CLASSES:
        assert name in str(err.value)


def test_rejection_keeps_per_class_and_reports_acceptance(ray_local, corpus, tiny_config):
    cfg = tiny_config(
        corpus,
        [
            "sample.per_class=2",
            "sample.batch_size=3",
            "sample.classes=[circle, triangle]",
            "sample.rejection.enabled=true",
            "sample.rejection.keep_fraction=0.4",
            "sample.rejection.classifier_steps=3",
        ],
    )
    write_upstream(cfg)
    manifest = sample.run(make_context(cfg))
    assert manifest.settings.draws_per_class == 5  # ceil(2 / 0.4)
    classifier_uri = os.path.join(storage.join(cfg.output_dir, "sample"), "classifier.pt")
    assert os.path.isfile(classifier_uri)
    classifier, _ = load_classifier(classifier_uri)
    for name, entry in manifest.classes.items():
        assert png_files(entry.dir) == ["00000.png", "00001.png"], name
        stats = entry.rejection
        assert stats.drawn == 5 and stats.kept == 2
        assert stats.acceptance_rate == pytest.approx(0.4)
        # The kept files, scored again by the saved classifier, are in decreasing confidence and
        # are the ones the statistics describe (which k of the draws they are: the test below).
        label = CLASSES.index(name)
        confidence = [
            float(predict_proba(classifier, to_model_input(read_png(entry.dir, f)))[0, label])
            for f in png_files(entry.dir)
        ]
        assert confidence == sorted(confidence, reverse=True)
        assert stats.min_confidence_kept == pytest.approx(confidence[-1], abs=1e-6)
        assert stats.mean_confidence_kept == pytest.approx(np.mean(confidence), abs=1e-6)
        assert stats.mean_confidence_kept >= stats.mean_confidence_drawn - 1e-6


def read_png(directory: str, name: str) -> np.ndarray:
    return np.asarray(Image.open(os.path.join(directory, name)).convert("RGB"))[None]


def test_rejection_keeps_exactly_the_most_confident_draws(tmp_path):
    # Draws arrive in any order; the kept files are the k most confident, most confident first,
    # ties going to the earlier draw. Each draw's image is a flat grey of value 10 * draw, so a
    # file tells which draw it holds.
    from pipelines.config import parse_config
    from pipelines.data.images import encode_png
    from tests.pipelines.conftest import tiny_raw_config

    cfg = parse_config(
        tiny_raw_config(str(tmp_path / "out"), str(tmp_path / "corpus")),
        ["sample.per_class=3", "sample.rejection.enabled=true"],
    ).sample
    confidences = [0.30, 0.90, 0.10, 0.55, 0.90, 0.20, 0.70, 0.05]
    predicted = [2, 2, 0, 1, 2, 3, 2, 1]  # the classifier's class of each draw; circle is 2
    output = generation.ClassOutput(str(tmp_path / "stage"), "circle", 2, cfg, (4, 4, 3))
    for draw in [5, 1, 7, 0, 4, 2, 6, 3]:
        image = np.full((4, 4, 3), 10 * draw, dtype=np.uint8)
        output.add(draw, encode_png(image), confidences[draw], predicted=predicted[draw])
    entry = output.finish()

    kept = [int(read_png(entry.dir, f)[0, 0, 0, 0]) // 10 for f in png_files(entry.dir)]
    assert kept == [1, 4, 6]  # 0.90 (draw 1), 0.90 (draw 4), 0.70
    stats = entry.rejection
    assert (stats.drawn, stats.kept) == (8, 3)
    assert stats.min_confidence_kept == pytest.approx(0.70)
    assert stats.mean_confidence_kept == pytest.approx((0.90 + 0.90 + 0.70) / 3)
    assert stats.mean_confidence_drawn == pytest.approx(np.mean(confidences))
    assert stats.drawn_classified_as_class == pytest.approx(4 / 8)  # draws 0, 1, 4 and 6


def test_single_level_model_and_resume(ray_local, corpus, tiny_config):
    cfg = tiny_config(corpus, ["sample.per_class=2", "sample.classes=[square, cross]"])
    write_upstream(cfg, single_level=True)
    first = sample.run(make_context(cfg))
    assert first.levels == ["codes"]
    square = first.classes["square"].dir
    before = {f: open(os.path.join(square, f), "rb").read() for f in png_files(square)}
    # An interrupted run: one class finished (marker written), the other lost its files.
    os.remove(os.path.join(storage.join(cfg.output_dir, "sample"), "done-square.json"))
    for f in png_files(square):
        os.remove(os.path.join(square, f))
    cross_marker = os.path.join(storage.join(cfg.output_dir, "sample"), "done-cross.json")
    stamp = os.path.getmtime(cross_marker)
    second = sample.run(make_context(cfg))
    assert second.classes == first.classes
    assert os.path.getmtime(cross_marker) == stamp  # the finished class was not redone
    assert {f: open(os.path.join(square, f), "rb").read() for f in png_files(square)} == before
