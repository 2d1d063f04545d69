"""The tokenize stage end to end on a real local Ray: counts, codes, dtypes, formats, resume,
class-mixed shards and the wids shard index."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.data import storage
from pipelines.data.corpus import open_corpus
from pipelines.data.demo_data import generate_corpus
from pipelines.data.images import to_model_input
from pipelines.data.keys import split_of
from pipelines.data.shards import (
    WIDS_INDEX_NAME,
    iter_code_samples,
    list_shards,
    read_key_index,
    write_shard,
)
from pipelines.manifest import write_manifest
from pipelines.stage import StageContext
from pipelines.stage_manifests import TrainVQVAEManifest
from pipelines.stages.tokenize import StoredShard, _reconcile, run
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


def _setup(tmp_path, tiny_config, images_per_class: int, corrupt: int, overrides=()):
    """A demo corpus, an autoencoder initialised on it with its train_vqvae manifest, and the
    tokenize StageContext: (ctx, model, images by key, labels by key)."""
    corpus_dir = str(tmp_path / "corpus")
    generate_corpus(
        corpus_dir,
        classes=CLASSES,
        images_per_class=images_per_class,
        image_size=16,
        corrupt_files=corrupt,
    )
    cfg = tiny_config(corpus_dir, overrides)
    corpus = open_corpus(cfg.data)
    rows = corpus.dataset("all").take_all()
    images = {r["key"]: r["image"] for r in rows}
    labels = {r["key"]: int(r["label"]) for r in rows}
    model = _make_autoencoder(to_model_input(np.stack(list(images.values()))))

    vq_dir = storage.join(cfg.output_dir, "train_vqvae")
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
    stage_dir = storage.join(cfg.output_dir, "tokenize")
    ctx = StageContext(
        cfg=cfg,
        stage="tokenize",
        stage_dir=stage_dir,
        fingerprint="fp-test",
        tracking=TrackingContext(tracking_uri="", run_id=None),
    )
    return ctx, model, images, labels


@pytest.fixture
def tokenize_setup(tmp_path, tiny_config, ray_local):
    return _setup(tmp_path, tiny_config, IMAGES_PER_CLASS, CORRUPT)


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


def test_a_killed_writers_temporary_file_is_removed_once_every_writer_has_finished(tmp_path):
    """A writer task on a lost node leaves its temporary file; Ray's retry writes the shard under
    the same content name. When the stage cross-checks the shards, the leftover goes and the
    shards stay."""
    stage_dir = str(tmp_path / "tokenize")
    storage.makedirs(stage_dir)
    written = {}
    for keys in (["a/1", "a/2"], ["b/1"]):
        codes = {"top": np.zeros((len(keys), 2, 2), np.uint8)}
        entry = write_shard(stage_dir, keys, [0] * len(keys), codes)
        written[entry.name] = StoredShard(entry)
    killed = storage.join(stage_dir, next(iter(written)) + ".5e6f7a8b" + storage.TMP_SUFFIX)
    storage.write_bytes(killed, b"half a tar")
    before = {uri: os.path.getmtime(uri) for uri in list_shards(stage_dir)}

    _reconcile(stage_dir, written, frozenset(), "folder", (0.2, 0.2))

    assert not storage.exists(killed)
    assert {uri: os.path.getmtime(uri) for uri in list_shards(stage_dir)} == before
    assert sorted(written) == sorted(uri.rsplit("/", 1)[-1] for uri in before)


# -------------------------------------------------------------------------------------------------
# Class-mixed shards, per-shard class counts and the wids index

MIXED_PER_CLASS = 50
MIXED_SHARD = 40


def _total_variation(counts: np.ndarray, reference: np.ndarray) -> float:
    return 0.5 * float(np.abs(counts / counts.sum() - reference / reference.sum()).sum())


def _max_tv_of_chunks(labels: np.ndarray, sizes: list[int], reference: np.ndarray) -> float:
    bounds = np.cumsum([0, *sizes])
    classes = len(reference)
    return max(
        _total_variation(np.bincount(labels[a:b], minlength=classes), reference)
        for a, b in zip(bounds[:-1], bounds[1:])
    )


def test_shards_mix_the_classes_of_a_class_sorted_corpus(tmp_path, tiny_config, ray_local):
    """On a corpus stored one class folder after another, every shard's class histogram is as
    close to the corpus histogram as that of a random partition into shards of the same sizes."""
    ctx, _, images, labels = _setup(
        tmp_path,
        tiny_config,
        MIXED_PER_CLASS,
        0,
        [f"tokenize.shard_max_samples={MIXED_SHARD}"],
    )
    manifest = run(ctx)
    assert manifest.samples == len(images) == MIXED_PER_CLASS * len(CLASSES)
    classes = len(CLASSES)
    corpus_hist = np.bincount([labels[k] for k in images], minlength=classes)

    # Per-shard class counts in the manifest are the labels stored in each shard.
    observed = []
    for shard in manifest.shards:
        stored = np.bincount(read_key_index(shard.uri).column("label").to_numpy(), minlength=4)
        from_tar = np.bincount([s["label"] for s in iter_code_samples([shard.uri])], minlength=4)
        np.testing.assert_array_equal(stored, from_tar)
        assert shard.class_counts == {c: int(n) for c, n in enumerate(from_tar) if n}
        observed.append(_total_variation(from_tar, corpus_hist))
    np.testing.assert_array_equal(
        sum(
            np.bincount(list(s.class_counts), list(s.class_counts.values()), 4)
            for s in manifest.shards
        ),
        corpus_hist,
    )

    # The bound: the 99.9th percentile, over random permutations of the corpus' labels cut into
    # shards of the sizes written, of the largest shard's total-variation distance. Shards cut
    # from a key-hash order are such a random partition (the hash knows nothing of classes).
    sizes = [s.samples for s in manifest.shards]
    rng = np.random.default_rng(0)
    label_array = np.repeat(np.arange(classes), corpus_hist)
    simulated = [
        _max_tv_of_chunks(rng.permutation(label_array), sizes, corpus_hist) for _ in range(2000)
    ]
    bound = float(np.quantile(simulated, 0.999))
    assert max(observed) <= bound, (observed, bound)
    # The bound tells orders apart: shards cut from the folder listing (one class after another)
    # break it, as tokenize's shards did before they were written in key-hash order.
    assert _max_tv_of_chunks(label_array, sizes, corpus_hist) > bound


def _class_sorted_copy(root, images: dict, labels: dict, layout: str, files_per_class: int):
    """The corpus rewritten one class per file: WebDataset shards or Parquet files (a row group
    per file)."""
    import pyarrow as pa

    from pipelines.data.images import encode_png

    os.makedirs(root)
    for label in range(len(CLASSES)):
        keys = sorted(k for k in images if labels[k] == label)
        for part in range(files_per_class):
            chosen = keys[part::files_per_class]
            name = os.path.join(root, f"class{label}-{part}")
            if layout == "webdataset":
                with tarfile.open(name + ".tar", "w") as tar:
                    for key in chosen:
                        for suffix, data in (
                            ("png", encode_png(images[key])),
                            ("cls", str(label).encode()),
                        ):
                            info = tarfile.TarInfo(f"{key.replace('/', '-')}.{suffix}")
                            info.size = len(data)
                            tar.addfile(info, io.BytesIO(data))
            else:
                table = pa.table(
                    {
                        "image": [encode_png(images[k]) for k in chosen],
                        "label": [label] * len(chosen),
                    }
                )
                pq.write_table(table, name + ".parquet")


@pytest.mark.parametrize("layout", ["webdataset", "parquet"])
def test_shards_mix_classes_of_a_corpus_stored_one_class_per_file(
    tmp_path, tiny_config, ray_local, layout
):
    """Tokenize reads the files of a WebDataset or Parquet corpus in groups whose samples
    alternate, so that shards of a corpus stored one class per file hold every class; read file
    by file (interleave 1), each shard holds one or two."""
    ctx, _, images, labels = _setup(tmp_path, tiny_config, MIXED_PER_CLASS, 0)
    source = str(tmp_path / layout)
    _class_sorted_copy(source, images, labels, layout, files_per_class=2)

    def tokenize(interleave: int, out: str):
        cfg = tiny_config(
            source,
            [f"tokenize.shard_max_samples={MIXED_SHARD}", f"tokenize.interleave={interleave}"],
        ).model_copy(update={"output_dir": ctx.cfg.output_dir})
        stage_dir = str(tmp_path / out)
        return run(StageContext(cfg, "tokenize", stage_dir, "fp", ctx.tracking))

    def largest_share(manifest) -> float:
        return max(max(s.class_counts.values()) / s.samples for s in manifest.shards)

    mixed = tokenize(16, "mixed")
    keys = [s["key"] for s in iter_code_samples([s.uri for s in mixed.shards])]
    assert len(keys) == len(set(keys)) == mixed.samples == len(images)
    # Each run of 40 rows alternates between the 8 files, 8 rows at a time: no class can take
    # more than 2 of its 5 chunks.
    assert all(len(s.class_counts) >= 3 for s in mixed.shards)
    assert largest_share(mixed) <= 0.5
    in_file_order = tokenize(1, "file-order")
    assert in_file_order.samples == len(images)
    assert largest_share(in_file_order) > 0.5


def test_shards_read_back_with_webdataset_and_wids(tokenize_setup):
    import webdataset as wds
    import wids

    ctx, _, images, labels = tokenize_setup
    manifest = run(ctx)
    index_uri = os.path.join(ctx.stage_dir, WIDS_INDEX_NAME)
    assert manifest.wids_index == index_uri
    index = json.loads(storage.read_bytes(index_uri))
    assert index["__kind__"] == "wids-shard-index-v1" and index["wids_version"] == 1
    assert [s["url"] for s in index["shardlist"]] == [s.name for s in manifest.shards]
    assert [s["nsamples"] for s in index["shardlist"]] == [s.samples for s in manifest.shards]

    ours = {s["key"]: s for s in iter_code_samples([s.uri for s in manifest.shards])}
    # webdataset's streaming reader over the shard URLs.
    streamed = list(wds.WebDataset([s.uri for s in manifest.shards], shardshuffle=False).decode())
    assert sorted(s["__key__"] for s in streamed) == sorted(images)
    for sample in streamed:
        key = sample["__key__"]
        assert int(sample["cls"]) == labels[key]
        np.testing.assert_array_equal(sample["bottom.npy"], ours[key]["bottom"])

    # wids' indexed reader on the index alone: relative shard names resolve next to it, and
    # every sample is reachable by position.
    dataset = wids.ShardListDataset(index_uri, transformations=[])
    assert len(dataset) == manifest.samples == len(images)
    by_index = [dataset[i] for i in range(len(dataset))]
    assert sorted(s["__key__"] for s in by_index) == sorted(images)
    for sample in by_index:
        key = sample["__key__"]
        assert int(sample[".cls"].read()) == labels[key]
        top = np.load(sample[".top.npy"], allow_pickle=False)
        np.testing.assert_array_equal(top, ours[key]["top"])
