"""The tokenize stage end to end on a real local Ray: counts, codes, dtypes, formats, resume."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines import storage
from pipelines.corpus import open_corpus
from pipelines.demo_data import generate_corpus
from pipelines.images import to_model_input
from pipelines.keys import split_of
from pipelines.manifest import write_manifest
from pipelines.shards import iter_code_samples, list_shards
from pipelines.stage import StageContext
from pipelines.stages.tokenize import run
from pipelines.stages.train_vqvae import TrainVQVAEManifest
from pipelines.tracking import TrackingContext
from vq_core.checkpoint import save_checkpoint
from vq_core.vqvae import VQVAE2, VQVAE2Config

IMAGES_PER_CLASS = 7
CORRUPT = 2
CLASSES = ("circle", "square", "triangle", "cross")


def _make_autoencoder(images: torch.Tensor) -> VQVAE2:
    # Sizes from the shared tiny config, but a bottom codebook above 256 codes so the two levels
    # are stored with different dtypes (uint8 top, uint16 bottom).
    config = VQVAE2Config(
        channels=16,
        res_blocks=1,
        res_channels=8,
        embed_dim=8,
        codebook_size_top=16,
        codebook_size_bottom=300,
    )
    torch.manual_seed(0)
    model = VQVAE2(config)
    model.train()
    with torch.no_grad():
        model(images)  # initialises both codebooks from data, so codes vary across images
    return model.eval()


@pytest.fixture
def tokenize_setup(tmp_path, tiny_config, ray_local):
    corpus_dir = str(tmp_path / "corpus")
    generate_corpus(
        corpus_dir,
        classes=CLASSES,
        images_per_class=IMAGES_PER_CLASS,
        image_size=16,
        corrupt_files=CORRUPT,
    )
    cfg = tiny_config(corpus_dir)
    corpus = open_corpus(cfg.data)
    rows = corpus.dataset("all").take_all()
    images = {r["key"]: r["image"] for r in rows}
    labels = {r["key"]: int(r["label"]) for r in rows}
    model = _make_autoencoder(to_model_input(np.stack(list(images.values()))))

    vq_dir = cfg.stage_dir("train_vqvae")
    storage.makedirs(vq_dir)
    checkpoint = storage.join(vq_dir, "model.pt")
    save_checkpoint(model, checkpoint)
    manifest = TrainVQVAEManifest.for_model(
        model,
        checkpoint=checkpoint,
        kind="vqvae2",
        image_size=(16, 16),
        channels=3,
        class_names=list(corpus.class_names),
    )
    assert manifest.codebook_sizes == {"top": 16, "bottom": 300}
    assert manifest.code_shapes == {"top": [2, 2], "bottom": [4, 4]}
    write_manifest(cfg.output_dir, manifest)
    stage_dir = cfg.stage_dir("tokenize")
    ctx = StageContext(
        cfg=cfg,
        stage="tokenize",
        stage_dir=stage_dir,
        fingerprint="fp-test",
        tracking=TrackingContext(tracking_uri="", run_id=None),
    )
    return ctx, model, images, labels


def _read_with_tarfile(uri: str) -> dict[str, dict]:
    samples: dict[str, dict] = {}
    with tarfile.open(uri) as tar:
        for member in tar.getmembers():
            head, _, last = member.name.rpartition("/")
            stem, _, field = last.partition(".")
            key = f"{head}/{stem}" if head else stem
            data = tar.extractfile(member).read()
            sample = samples.setdefault(key, {})
            if field == "cls":
                sample["label"] = int(data)
            else:
                sample[field[: -len(".npy")]] = np.load(io.BytesIO(data), allow_pickle=False)
    return samples


def test_tokenize_writes_every_valid_image_once_with_the_models_codes(tokenize_setup):
    ctx, model, images, labels = tokenize_setup
    manifest = run(ctx)

    valid = CLASSES.__len__() * IMAGES_PER_CLASS
    assert manifest.samples == valid == len(images)
    assert sum(manifest.splits.values()) == valid
    for split in ("train", "validation", "test"):
        assert manifest.splits[split] == sum(split_of(k, 0.2, 0.2) == split for k in images)
    assert manifest.code_dtypes == {"top": "uint8", "bottom": "uint16"}
    assert manifest.levels == ["top", "bottom"]
    assert manifest.class_names == sorted(CLASSES)
    assert all(s.samples <= ctx.cfg.tokenize.shard_max_samples for s in manifest.shards)
    assert sum(s.samples for s in manifest.shards) == valid
    assert [s.uri for s in manifest.shards] == list_shards(ctx.stage_dir)

    # Bad inputs: counted, listed by key, and in the Parquet table with a reason.
    assert manifest.bad_inputs.count == CORRUPT
    assert manifest.bad_inputs.keys == ["circle/broken-000", "square/broken-001"]
    table = pq.read_table(manifest.bad_inputs.table).to_pylist()
    assert [r["key"] for r in table] == manifest.bad_inputs.keys
    assert all(r["reason"] and r["source"].endswith(".png") for r in table)

    # Read back with plain tarfile + numpy: keys exactly once, dtypes, labels, codes == encode().
    seen: dict[str, dict] = {}
    for shard in manifest.shards:
        for key, sample in _read_with_tarfile(shard.uri).items():
            assert key not in seen, f"{key} is in two shards"
            seen[key] = sample
    assert set(seen) == set(images)
    keys = sorted(images)
    top, bottom = model.encode(to_model_input(np.stack([images[k] for k in keys])))
    assert len(torch.unique(bottom)) > 1, "test model should produce varied codes"
    for i, key in enumerate(keys):
        assert seen[key]["label"] == labels[key]
        assert seen[key]["top"].dtype == np.uint8 and seen[key]["top"].shape == (2, 2)
        assert seen[key]["bottom"].dtype == np.uint16 and seen[key]["bottom"].shape == (4, 4)
        np.testing.assert_array_equal(seen[key]["top"], top[i].numpy())
        np.testing.assert_array_equal(seen[key]["bottom"], bottom[i].numpy())

    # And with webdataset's reader: the same samples.
    via_wds = {s["key"]: s for s in iter_code_samples([s.uri for s in manifest.shards])}
    assert set(via_wds) == set(images)
    for key in keys:
        np.testing.assert_array_equal(via_wds[key]["bottom"], seen[key]["bottom"])
        assert via_wds[key]["label"] == labels[key]

    # Codes cost 1 byte (top, K=16) + 2 bytes (bottom, K=300) per position plus tar overhead,
    # far below the 8 bytes per code of int64.
    assert manifest.metrics["bytes_per_image_int64"] == 8 * (4 + 16)


def test_tokenize_resumes_without_duplicating_or_losing_samples(tokenize_setup):
    ctx, _, images, _ = tokenize_setup
    first = run(ctx)
    shards = list_shards(ctx.stage_dir)
    assert len(shards) >= 2

    # Simulate a crash part way: one shard never finished (only its temporary file exists) and
    # the manifest was never written.
    lost = shards[0]
    os.rename(lost, lost + ".1a2b3c4d.partial")
    kept = {uri: os.path.getmtime(uri) for uri in shards[1:]}

    second = run(ctx)
    assert not [f for f in storage.list_files(ctx.stage_dir) if f.endswith(".partial")]
    assert second.samples == first.samples == len(images)
    assert second.metrics["resumed_samples"] == first.samples - next(
        s.samples for s in first.shards if s.uri == lost
    )
    keys = [s["key"] for s in iter_code_samples([s.uri for s in second.shards])]
    assert sorted(keys) == sorted(images)  # every image exactly once
    for uri, mtime in kept.items():  # finished shards were kept, not rewritten
        assert os.path.getmtime(uri) == mtime
    assert second.bad_inputs.count == CORRUPT  # bad inputs are reported again
