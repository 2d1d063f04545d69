"""Stage 2: tokenize the corpus into code shards with the trained autoencoder.

    corpus files --read+decode (Ray tasks)--> images --encode (actor pool, model loaded once per
    actor)--> code maps --write (Ray tasks, one shard per call)--> codes-<hash>.tar

Everything streams: no stage holds more than a few batches, so memory stays flat with corpus size.
Encoding runs under torch.inference_mode inside ``model.encode``; codes are narrowed to uint8 or
uint16 in the actor, so what crosses the object store is already the stored size.

Resume: shards appear atomically under content-derived names (pipelines.shards), so after a crash
the stage directory holds complete shards and perhaps ``*.partial`` leftovers. A re-run removes the
leftovers, reads the keys of the complete shards and drops those rows before decoding; every valid
image still ends up in exactly one shard. Bad inputs are never written, so they are found (and
reported) again on every run.
"""

from __future__ import annotations

import io
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import numpy as np

from pipelines import storage
from pipelines.corpus import Corpus, open_corpus
from pipelines.errors import ConfigError
from pipelines.keys import key_hashes, split_of
from pipelines.manifest import ManifestModel, StageManifest, require_manifest
from pipelines.shards import (
    CodeShards,
    ShardEntry,
    code_dtype,
    list_shards,
    read_shard_keys,
    write_shard,
)
from pipelines.stage import StageContext, StageSpec
from pipelines.stages.train_vqvae import TrainVQVAEManifest

log = logging.getLogger("vqpipe")

BAD_INPUTS_NAME = "bad_inputs.parquet"
BAD_KEYS_IN_MANIFEST = 100
# Writing a shard is a few MB of serialisation and I/O. Writers reserve no CPU so they never wait
# behind readers and encoders holding every slot, which would pile codes up in the object store.
WRITER_CPUS = 0.0


class BadInputs(ManifestModel):
    count: int
    keys: list[str]  # the first BAD_KEYS_IN_MANIFEST, in key order
    table: str  # Parquet table of every bad input: key, source, reason


class TokenizeManifest(StageManifest, CodeShards):
    """The code shards of the corpus (``CodeShards``: the shards and how to read them) and what
    they were made from."""

    stage: ClassVar[str] = "tokenize"

    samples: int
    splits: dict[str, int]
    codebook_sizes: dict[str, int]
    class_names: list[str]
    checkpoint: str
    image_size: list[int]
    channels: int
    bad_inputs: BadInputs
    metrics: dict[str, float]

    def summary(self) -> str:
        return f"{self.samples} samples in {len(self.shards)} shards, {self.bad_inputs.count} bad inputs"


class CodeEncoder:
    """Ray Data actor: loads the autoencoder once and turns image batches into code maps."""

    def __init__(
        self, checkpoint: str, levels: list[str], dtypes: dict[str, str], threads: int, gpu: bool
    ):
        import torch

        from vq_core.checkpoint import load_checkpoint

        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")
        self.model, _ = load_checkpoint(storage.read_bytes(checkpoint), map_location=self.device)
        if list(self.model.levels) != list(levels):
            raise ValueError(
                f"{checkpoint} holds a model with levels {list(self.model.levels)}, but the "
                f"train_vqvae manifest says {levels}"
            )
        self.levels = list(levels)
        self.dtypes = {level: np.dtype(dtypes[level]) for level in levels}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipelines.images import to_model_input

        good = batch["error"] == ""
        images = batch["image"]
        count = len(images)
        out = {name: batch[name] for name in ("key", "label", "split", "error", "source")}
        height, width = images.shape[1:3]
        shapes = self.model.code_shape(height, width)
        for level, (h, w) in zip(self.levels, shapes):
            out[level] = np.zeros((count, h, w), dtype=self.dtypes[level])
        if good.any():
            x = to_model_input(images[good]).to(self.device)
            for level, codes in zip(self.levels, self.model.encode(x)):
                out[level][good] = codes.cpu().numpy().astype(self.dtypes[level])
        return out


def _write_batch(
    batch: dict[str, np.ndarray], stage_dir: str, levels: list[str]
) -> dict[str, np.ndarray]:
    """Write the batch's valid rows as one shard; report the shard and the batch's bad rows."""
    good = np.flatnonzero(batch["error"] == "")
    bad = np.flatnonzero(batch["error"] != "")
    info = {"name": "", "uri": "", "samples": 0, "bytes": 0}
    counts = {"validation": 0, "test": 0}
    if len(good):
        info = write_shard(
            stage_dir,
            [str(k) for k in batch["key"][good]],
            batch["label"][good].tolist(),
            {level: batch[level][good] for level in levels},
        )
        for split in counts:
            counts[split] = int(sum(str(s) == split for s in batch["split"][good]))
    bad_rows = [
        {
            "key": str(batch["key"][i]),
            "source": str(batch["source"][i]),
            "reason": str(batch["error"][i]),
        }
        for i in bad
    ]
    return {
        "name": np.array([info["name"]], dtype=object),
        "uri": np.array([info["uri"]], dtype=object),
        "samples": np.array([info["samples"]], dtype=np.int64),
        "bytes": np.array([info["bytes"]], dtype=np.int64),
        "validation": np.array([counts["validation"]], dtype=np.int64),
        "test": np.array([counts["test"]], dtype=np.int64),
        "bad": np.array([json.dumps(bad_rows)], dtype=object),
    }


def _describe_shards(uris: list[str], fractions: tuple[float, float]) -> dict[str, dict[str, Any]]:
    """name -> {name, uri, samples, bytes, validation, test, keys} for complete shards on storage."""
    if not uris:
        return {}
    # Reading keys means streaming each tar once; threads overlap the I/O of an object store.
    with ThreadPoolExecutor(max_workers=8) as pool:
        all_keys = list(pool.map(read_shard_keys, uris))
    shards = {}
    for uri, keys in zip(uris, all_keys):
        fs, path = storage.resolve(uri)
        name = uri.rsplit("/", 1)[-1]
        shards[name] = {
            "name": name,
            "uri": uri,
            "samples": len(keys),
            "bytes": fs.get_file_info(path).size,
            "validation": sum(split_of(k, *fractions) == "validation" for k in keys),
            "test": sum(split_of(k, *fractions) == "test" for k in keys),
            "keys": keys,
        }
    return shards


def _write_bad_table(stage_dir: str, bad: list[dict[str, str]]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "key": pa.array([b["key"] for b in bad], pa.string()),
            "source": pa.array([b["source"] for b in bad], pa.string()),
            "reason": pa.array([b["reason"] for b in bad], pa.string()),
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    uri = storage.join(stage_dir, BAD_INPUTS_NAME)
    storage.write_bytes(uri, buffer.getvalue())
    return uri


def _check_upstream(upstream: TrainVQVAEManifest, size_hw: tuple[int, int], channels: int) -> None:
    if list(upstream.image_size) != list(size_hw) or upstream.channels != channels:
        raise ConfigError(
            f"the autoencoder was trained on {upstream.image_size} images with "
            f"{upstream.channels} channels, but data.image_size/channels now ask for "
            f"{list(size_hw)} with {channels}; re-run train_vqvae or restore the data settings"
        )


def _resume(
    stage_dir: str, fraction: tuple[float, float]
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """(complete shards already written, their keys); removes leftovers of unfinished writes."""
    storage.makedirs(stage_dir)
    leftovers = storage.remove_partials(stage_dir)
    existing = _describe_shards(list_shards(stage_dir), fraction)
    done_keys = [k for shard in existing.values() for k in shard.pop("keys")]
    if leftovers or existing:
        log.info(
            "tokenize: resuming; removed %d partial file(s), keeping %d shard(s) with %d samples",
            leftovers,
            len(existing),
            len(done_keys),
        )
    return existing, done_keys


def _encode_and_write(
    ctx: StageContext,
    corpus: Corpus,
    upstream: TrainVQVAEManifest,
    dtypes: dict[str, str],
    done_keys: list[str],
):
    """The streaming dataset that encodes the images not yet in a shard and writes new shards;
    one row per written batch: the shard's entry and the batch's bad inputs."""
    import ray

    settings = ctx.cfg.tokenize
    ds = corpus.dataset(
        "all", keep_errors=True, skip_keys=key_hashes(done_keys) if done_keys else None
    )
    ds = ds.map_batches(
        CodeEncoder,
        fn_constructor_kwargs={
            "checkpoint": upstream.checkpoint,
            "levels": upstream.levels,
            "dtypes": dtypes,
            "threads": int(settings.cpus_per_actor),
            "gpu": settings.gpus_per_actor > 0,
        },
        compute=ray.data.ActorPoolStrategy(size=settings.num_actors),
        num_cpus=settings.cpus_per_actor,
        num_gpus=settings.gpus_per_actor,
        batch_size=settings.batch_size,
        batch_format="numpy",
    )
    return ds.map_batches(
        _write_batch,
        fn_kwargs={"stage_dir": ctx.stage_dir, "levels": upstream.levels},
        batch_size=settings.shard_max_samples,
        batch_format="numpy",
        num_cpus=WRITER_CPUS,
        # Without a CPU reservation nothing else bounds how many writers run at once, and each
        # concurrent task is a worker process; one writer per encoder keeps up with the encoders.
        concurrency=settings.num_actors,
    )


def _collect(ds: Any, shards: dict[str, dict[str, Any]]) -> tuple[list[dict[str, str]], int]:
    """Run the dataset; add each written shard to ``shards``; return (bad inputs, new samples)."""
    bad: list[dict[str, str]] = []
    new_samples = 0
    for row in ds.iter_rows():
        bad.extend(json.loads(row["bad"]))
        if row["name"]:
            shards[row["name"]] = {
                "name": row["name"],
                "uri": row["uri"],
                "samples": int(row["samples"]),
                "bytes": int(row["bytes"]),
                "validation": int(row["validation"]),
                "test": int(row["test"]),
            }
            new_samples += int(row["samples"])
            log.info("tokenize: wrote %s (%d samples)", row["name"], row["samples"])
    return bad, new_samples


def _reconcile(
    stage_dir: str, shards: dict[str, dict[str, Any]], fraction: tuple[float, float]
) -> None:
    """Cross-check the reported shards with the directory.

    A writer task that Ray retries rewrites the same content-named shard, so the two agree unless
    storage lost or gained files meanwhile.
    """
    on_disk = {uri.rsplit("/", 1)[-1]: uri for uri in list_shards(stage_dir)}
    missing = sorted(set(shards) - set(on_disk))
    if missing:
        raise RuntimeError(f"shards reported as written are missing from {stage_dir}: {missing}")
    unreported = sorted(set(on_disk) - set(shards))
    if unreported:
        log.warning("tokenize: listing shards nobody reported: %s", unreported)
        for name, info in _describe_shards([on_disk[n] for n in unreported], fraction).items():
            info.pop("keys")
            shards[name] = info


def run(ctx: StageContext) -> TokenizeManifest:
    """Tokenize the corpus into code shards; returns the stage's manifest."""
    cfg = ctx.cfg
    upstream = require_manifest(cfg.output_dir, TrainVQVAEManifest)
    _check_upstream(upstream, cfg.data.size_hw, cfg.data.channels)
    levels = upstream.levels
    dtypes = {level: code_dtype(upstream.codebook_sizes[level]).name for level in levels}
    fraction = (cfg.data.validation_fraction, cfg.data.test_fraction)

    shards, done_keys = _resume(ctx.stage_dir, fraction)
    ctx.tracking.log_params(
        {
            ctx.stage: cfg.tokenize.model_dump(),
            "levels": levels,
            "code_dtypes": dtypes,
            "checkpoint": upstream.checkpoint,
        }
    )
    corpus = open_corpus(cfg.data)
    start = time.perf_counter()
    bad, new_samples = _collect(_encode_and_write(ctx, corpus, upstream, dtypes, done_keys), shards)
    elapsed = time.perf_counter() - start
    _reconcile(ctx.stage_dir, shards, fraction)

    bad.sort(key=lambda b: b["key"])
    bad_table = _write_bad_table(ctx.stage_dir, bad)
    listed = [shards[name] for name in sorted(shards)]
    samples = sum(s["samples"] for s in listed)
    validation = sum(s["validation"] for s in listed)
    test = sum(s["test"] for s in listed)
    total_bytes = sum(s["bytes"] for s in listed)
    codes_per_image = sum(h * w for h, w in (upstream.code_shapes[level] for level in levels))
    metrics = {
        "samples": samples,
        "new_samples": new_samples,
        "resumed_samples": len(done_keys),
        "bad_inputs": len(bad),
        "shards": len(listed),
        "seconds": elapsed,
        "images_per_second": new_samples / elapsed if elapsed > 0 else 0.0,
        "bytes_per_image": total_bytes / samples if samples else 0.0,
        "bytes_per_image_int64": 8.0 * codes_per_image,
    }
    ctx.tracking.log_metrics(metrics)
    log.info(
        "tokenize: %d samples in %d shards (%d new, %.1f images/s, %.0f bytes/image), %d bad inputs",
        samples,
        len(listed),
        new_samples,
        metrics["images_per_second"],
        metrics["bytes_per_image"],
        len(bad),
    )
    return TokenizeManifest(
        shards=[ShardEntry(**{k: s[k] for k in ShardEntry.model_fields}) for s in listed],
        samples=samples,
        splits={"train": samples - validation - test, "validation": validation, "test": test},
        levels=levels,
        code_shapes={level: list(upstream.code_shapes[level]) for level in levels},
        code_dtypes=dtypes,
        codebook_sizes={level: upstream.codebook_sizes[level] for level in levels},
        class_names=list(corpus.class_names),
        checkpoint=upstream.checkpoint,
        validation_fraction=fraction[0],
        test_fraction=fraction[1],
        image_size=list(cfg.data.size_hw),
        channels=cfg.data.channels,
        bad_inputs=BadInputs(
            count=len(bad),
            keys=[b["key"] for b in bad[:BAD_KEYS_IN_MANIFEST]],
            table=bad_table,
        ),
        metrics=metrics,
    )


SPEC = StageSpec(
    manifest=TokenizeManifest,
    run=run,
    description="encode the corpus into WebDataset shards of codes with Ray Data",
    upstream=(TrainVQVAEManifest,),
    sections=("data",),
    reads_corpus=True,
)
