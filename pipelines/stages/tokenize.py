"""Stage 2: tokenize the corpus into code shards with the trained or a pinned autoencoder.

    corpus files in key-hash order --read+decode (Ray tasks)--> images --encode (actor pool, model
    loaded once per actor)--> code maps --write (Ray tasks, one shard per call)--> codes-<hash>.tar
                                                                       + codes-<hash>.keys.parquet

Everything streams: no stage holds more than a few batches, so memory stays flat with corpus size.
Encoding runs under torch.inference_mode inside ``model.encode``; codes are narrowed to uint8 or
uint16 in the actor, so what crosses the object store is already the stored size.

Class-mixed shards: the files are read in the order of a hash of their keys (the listing is known
before any image is read), so consecutive rows, and therefore each shard, are a class-blind
sample of the whole corpus rather than a run of one class folder. A folder corpus is ordered image
by image; WebDataset and Parquet corpora, whose keys live inside their files, file by file.

Resume and growing corpora: shards appear atomically under content-derived names
(pipelines.data.shards), each after its key index, so the stage directory holds complete shards and
perhaps ``*.partial`` leftovers. A run first removes the leftovers, then one Ray task reads the key
indexes (never the tars): the keys whose source file is still in the corpus become the set of
finished keys, shipped to the reader tasks as a sorted hash array in the object store (the driver
never holds it), and rows with those keys are dropped before decoding; the keys whose source file
left the corpus are recorded as removed (``removed.parquet``, which every reader in
pipelines.data.shards honours) while their shards stay byte-identical. So after an interruption, or
when the runner re-runs the stage because only the corpus listing changed, only images not yet in
a shard are encoded, into new shards, and every valid image is in exactly one live sample. Bad
inputs are never written, so they are found (and reported) again on every run.

A source file changed in place under the same name keeps its old codes; remove it in one run and
add it back in a later one to re-encode it.

The autoencoder is this run's train_vqvae, or the checkpoint ``tokenize.checkpoint`` pins
(``pipelines.tokenizer``): then train_vqvae is not an upstream stage, the checkpoint's sha256 is
part of the stage's identity (another tokenizer re-encodes everything), and the checkpoint is
read and checked against data.image_size/channels before anything is written. The manifest names
the tokenizer (sha256, and the registered model's name and version) and the corpus
(``tokenize.corpus_name``), which is how train_prior unites code datasets safely.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from pipelines import console
from pipelines.config import PipelineConfig, load_config, parse_config
from pipelines.data import storage
from pipelines.data.corpus import IMAGE_EXTENSIONS, Corpus, open_corpus
from pipelines.data.keys import key_hashes, sanitize_key, split_of
from pipelines.data.shards import (
    ShardEntry,
    code_dtype,
    is_key_index,
    key_index_uri,
    list_shards,
    read_key_index,
    removed_table_bytes,
    shard_of_key_index,
    write_shard,
    write_wids_index,
)
from pipelines.errors import ConfigError
from pipelines.manifest import require_manifest
from pipelines.stage import StageContext, StageSpec
from pipelines.stage_manifests import (
    BAD_KEYS_IN_MANIFEST,
    BadInputs,
    TokenizeManifest,
    TrainVQVAEManifest,
)
from pipelines.tokenizer import (
    PinnedTokenizer,
    TokenizerIdentity,
    read_tokenizer,
    tracking_uri_for,
)

log = logging.getLogger("vqpipe")

BAD_INPUTS_NAME = "bad_inputs.parquet"
REMOVED_NAME = "removed.parquet"
# Writing a shard is a few MB of serialisation and I/O. Writers reserve no CPU so they never wait
# behind readers and encoders holding every slot, which would pile codes up in the object store.
WRITER_CPUS = 0.0


@dataclass(frozen=True)
class StoredShard:
    """A complete shard in the stage folder: its manifest entry, and how many of its live samples
    fall in the validation and the test split (the others are training samples)."""

    entry: ShardEntry
    validation: int = 0
    test: int = 0


class CodeEncoder:
    """Ray Data actor: loads the autoencoder once and turns image batches into code maps."""

    def __init__(
        self, checkpoint: list, levels: list[str], dtypes: dict[str, str], threads: int, gpu: bool
    ):
        import ray
        import torch

        from vq_core.checkpoint import load_checkpoint

        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")
        # The checkpoint's bytes come through the object store (an ObjectRef in a list, so that
        # nothing resolves it early): a pinned checkpoint may be a file only the driver can read.
        self.model, _ = load_checkpoint(ray.get(checkpoint[0]), map_location=self.device)
        if list(self.model.levels) != list(levels):
            raise ValueError(
                f"the tokenizer holds a model with levels {list(self.model.levels)}, expected "
                f"{levels}"
            )
        self.levels = list(levels)
        self.dtypes = {level: np.dtype(dtypes[level]) for level in levels}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipelines.data.images import to_model_input

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
    batch: dict[str, np.ndarray], stage_dir: str, levels: list[str], labelled: bool = True
) -> dict[str, np.ndarray]:
    """Write the batch's valid rows as one shard (without classes for an unlabelled corpus);
    report the shard and the batch's bad rows."""
    good = np.flatnonzero(batch["error"] == "")
    bad = np.flatnonzero(batch["error"] != "")
    entry = ShardEntry(name="", uri="", samples=0, bytes=0)
    counts = {"validation": 0, "test": 0}
    if len(good):
        entry = write_shard(
            stage_dir,
            [str(k) for k in batch["key"][good]],
            batch["label"][good].tolist() if labelled else None,
            {level: batch[level][good] for level in levels},
            sources=[str(x) for x in batch["source"][good]],
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
        "name": np.array([entry.name], dtype=object),
        "uri": np.array([entry.uri], dtype=object),
        "samples": np.array([entry.samples], dtype=np.int64),
        "bytes": np.array([entry.bytes], dtype=np.int64),
        "validation": np.array([counts["validation"]], dtype=np.int64),
        "test": np.array([counts["test"]], dtype=np.int64),
        "class_counts": np.array([json.dumps(entry.class_counts)], dtype=object),
        "bad": np.array([json.dumps(bad_rows)], dtype=object),
    }


def _source_file(source: str, corpus_format: str) -> str:
    """The corpus file a row's ``source`` (as the corpus reader writes it) came from."""
    if corpus_format == "webdataset":
        return source.rsplit(":", 1)[0]  # "<tar path>:<sample key>"
    if corpus_format == "parquet":
        return source.split("#row=", 1)[0]  # "<file>#row=<index>"
    return source  # the image file itself


def _describe_shard(
    uri: str, present: frozenset[str], corpus_format: str, fractions: tuple[float, float]
) -> dict[str, Any]:
    """A finished shard from its key index: the shard with its split counts, its removed keys
    (samples whose source file is not in ``present``) as (shard, key) pairs, and the hashes of
    its live keys."""
    fs, path = storage.resolve(uri)
    name = uri.rsplit("/", 1)[-1]
    index = read_key_index(uri)
    live_keys, removed, counts, splits = [], [], Counter(), Counter()
    keys = index.column("key").to_pylist()
    labels = index.column("label").to_pylist()
    sources = index.column("source").to_pylist()
    for key, label, source in zip(keys, labels, sources):
        # A shard written without sources (older runs, hand-made shards) is never pruned.
        if source and _source_file(source, corpus_format) not in present:
            removed.append((name, key))
            continue
        live_keys.append(key)
        if label is not None:  # null in the key index of an unlabelled corpus
            counts[int(label)] += 1
        splits[split_of(key, *fractions)] += 1
    entry = ShardEntry(
        name=name,
        uri=uri,
        samples=len(keys),
        bytes=fs.get_file_info(path).size,
        class_counts=dict(sorted(counts.items())),
        removed=len(removed),
    )
    return {
        "shard": StoredShard(entry, validation=splits["validation"], test=splits["test"]),
        "removed": removed,
        "live_hashes": key_hashes(live_keys),
    }


def _scan_finished(
    uris: list[str], present: frozenset[str], corpus_format: str, fractions: tuple[float, float]
) -> tuple[np.ndarray, list[StoredShard], list[tuple[str, str]]]:
    """Runs as a Ray task: (sorted hashes of every live finished key, the shards, removed
    (shard, key) pairs). The hash array goes to the object store, not to the driver."""
    # Key indexes are small files; threads overlap the latency of an object store.
    with ThreadPoolExecutor(max_workers=8) as pool:
        described = list(
            pool.map(lambda u: _describe_shard(u, present, corpus_format, fractions), uris)
        )
    hashes = np.unique(
        np.concatenate([d["live_hashes"] for d in described] or [np.zeros(0, np.uint64)])
    )
    removed = [pair for d in described for pair in d["removed"]]
    return hashes, [d["shard"] for d in described], removed


def _remove_unfinished(stage_dir: str) -> list[str]:
    """Delete what interrupted writers left; return the URIs of the complete shards.

    A shard is complete when it and its key index exist. Temporary files and indexes whose shard
    never appeared are removed; so are shards without an index (written before indexes
    existed), whose samples are then simply encoded again.
    """
    storage.makedirs(stage_dir)
    leftovers = storage.remove_partials(stage_dir)
    files = set(storage.list_files(stage_dir, recursive=False))
    shards = list_shards(stage_dir)
    for uri in shards:
        if key_index_uri(uri) not in files:
            log.warning("tokenize: %s has no key index; its samples are encoded again", uri)
            storage.remove(uri)
            leftovers += 1
    for uri in files:
        if is_key_index(uri) and shard_of_key_index(uri) not in files:
            storage.remove(uri)
            leftovers += 1
    complete = [u for u in shards if key_index_uri(u) in files]
    if leftovers:
        log.info("tokenize: removed %d leftover file(s) of unfinished writes", leftovers)
    return complete


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


def _order_hash(key: str) -> int:
    # Its own hash, independent of split_of's: ordering by the split hash would put every
    # test and validation key in the first shards.
    return int.from_bytes(
        hashlib.blake2b(key.encode(), digest_size=8, person=b"vqpipe-order").digest(), "big"
    )


def _folder_images(corpus: Corpus) -> list[tuple[str, str]]:
    """(key, file URI) of every image a folder corpus reader would read."""
    root = storage.resolve(corpus.cfg.source)[1].rstrip("/")
    suffixes = tuple(f".{e}" for e in IMAGE_EXTENSIONS)
    found = []
    for class_dir in corpus.files:
        base = storage.resolve(class_dir)[1].rstrip("/")
        for uri in storage.list_files(class_dir):
            path = storage.resolve(uri)[1]
            # The same files Ray's directory reader takes: no hidden entries, image suffixes.
            if path[len(base) :].lstrip("/").startswith((".", "_")):
                continue
            if not path.lower().endswith(suffixes):
                continue
            rel = path[len(root) :].lstrip("/")
            found.append((sanitize_key(os.path.splitext(rel)[0]), uri))
    return found


def in_key_hash_order(corpus: Corpus) -> tuple[Corpus, frozenset[str]]:
    """The corpus with its files in key-hash order, and the set of its source files.

    The files' names join the set both as URIs and as filesystem paths, the two forms in which
    the corpus reader reports a row's source.
    """
    if corpus.format == "folder":
        images = _folder_images(corpus)
        images.sort(key=lambda item: _order_hash(item[0]))
        files = [uri for _, uri in images]
    else:
        files = sorted(corpus.files, key=lambda uri: _order_hash(uri.rsplit("/", 1)[-1]))
    present = frozenset(files) | frozenset(storage.resolve(u)[1] for u in files)
    return Corpus(corpus.cfg, corpus.format, files, list(corpus.class_names)), present


def _encode_and_write(
    ctx: StageContext,
    corpus: Corpus,
    tokenizer: PinnedTokenizer,
    dtypes: dict[str, str],
    skip_ref: Any,
):
    """The streaming dataset that encodes the images not yet in a shard and writes new shards;
    one row per written batch: the shard's entry and the batch's bad inputs. ``skip_ref`` is an
    ObjectRef of the sorted hashes of finished keys, or None."""
    import ray

    settings = ctx.cfg.tokenize
    ds = corpus.dataset("all", keep_errors=True, skip_keys=skip_ref, interleave=settings.interleave)
    ds = ds.map_batches(
        CodeEncoder,
        fn_constructor_kwargs={
            "checkpoint": [ray.put(tokenizer.data)],
            "levels": list(tokenizer.levels),
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
        fn_kwargs={
            "stage_dir": ctx.stage_dir,
            "levels": list(tokenizer.levels),
            "labelled": corpus.labelled,
        },
        batch_size=settings.shard_max_samples,
        batch_format="numpy",
        num_cpus=WRITER_CPUS,
        # Without a CPU reservation nothing else bounds how many writers run at once, and each
        # concurrent task is a worker process; one writer per encoder keeps up with the encoders.
        compute=ray.data.TaskPoolStrategy(size=settings.num_actors),
    )


def _collect(
    ds: Any, shards: dict[str, StoredShard], progress: Any = None
) -> tuple[list[dict[str, str]], int]:
    """Run the dataset; add each written shard to ``shards``; return (bad inputs, new samples).

    ``progress`` (a ``pipelines.console.Progress``) counts the images done and shards written.
    """
    bad: list[dict[str, str]] = []
    new_samples = 0
    for row in ds.iter_rows():
        row_bad = json.loads(row["bad"])
        bad.extend(row_bad)
        if progress is not None:
            progress.update(
                advance=int(row["samples"]) + len(row_bad), shards=len(shards) + bool(row["name"])
            )
        if row["name"]:
            entry = ShardEntry(
                name=row["name"],
                uri=row["uri"],
                samples=int(row["samples"]),
                bytes=int(row["bytes"]),
                class_counts={int(k): v for k, v in json.loads(row["class_counts"]).items()},
            )
            shards[row["name"]] = StoredShard(
                entry, validation=int(row["validation"]), test=int(row["test"])
            )
            new_samples += int(row["samples"])
            log.info("tokenize: wrote %s (%d samples)", row["name"], row["samples"])
    return bad, new_samples


def _reconcile(
    stage_dir: str,
    shards: dict[str, StoredShard],
    present: frozenset[str],
    corpus_format: str,
    fractions: tuple[float, float],
) -> None:
    """Cross-check the reported shards with the directory.

    A writer task that Ray retries rewrites the same content-named shard, so the two agree unless
    storage lost or gained files meanwhile. The temporary file of an attempt that was killed
    (its node lost) is removed here, once every writer has finished.
    """
    leftovers = storage.remove_partials(stage_dir)
    if leftovers:
        log.info("tokenize: removed %d temporary file(s) of killed writers", leftovers)
    on_disk = {uri.rsplit("/", 1)[-1]: uri for uri in list_shards(stage_dir)}
    missing = sorted(set(shards) - set(on_disk))
    if missing:
        raise RuntimeError(f"shards reported as written are missing from {stage_dir}: {missing}")
    unreported = sorted(set(on_disk) - set(shards))
    if unreported:
        log.warning("tokenize: listing shards nobody reported: %s", unreported)
        for name in unreported:
            shards[name] = _describe_shard(on_disk[name], present, corpus_format, fractions)[
                "shard"
            ]


def _finished_work(
    stage_dir: str, present: frozenset[str], corpus_format: str, fractions: tuple[float, float]
) -> tuple[Any, dict[str, StoredShard], list[tuple[str, str]]]:
    """(ObjectRef of finished live key hashes or None, finished shards by name, removed pairs)."""
    import ray

    uris = _remove_unfinished(stage_dir)
    if not uris:
        return None, {}, []
    scan = ray.remote(num_returns=3)(_scan_finished)
    hashes_ref, shards_ref, removed_ref = scan.remote(uris, present, corpus_format, fractions)
    shards, removed = ray.get([shards_ref, removed_ref])
    return hashes_ref, {s.entry.name: s for s in shards}, removed


def _write_removed(stage_dir: str, removed: list[tuple[str, str]]) -> str:
    """The removed-samples table, or "" (and no stale file) when nothing was removed."""
    uri = storage.join(stage_dir, REMOVED_NAME)
    if not removed:
        storage.remove(uri)
        return ""
    storage.write_bytes(uri, removed_table_bytes(removed))
    return uri


def default_corpus_name(source: str) -> str:
    """The last folder (or file, without its suffix) name of a corpus' source."""
    name = source.rstrip("/").rsplit("/", 1)[-1]
    return os.path.splitext(name)[0] or name or "corpus"


def pinned_tokenizer(cfg: Any) -> PinnedTokenizer:
    """The checkpoint tokenize.checkpoint pins, read and checked against the data settings."""
    pinned = read_tokenizer(cfg.tokenize.checkpoint, tracking_uri_for(cfg))
    pinned.check_fits(cfg.data.size_hw, cfg.data.channels, "data.image_size/data.channels")
    return pinned


def _tokenizer(cfg: Any) -> tuple[PinnedTokenizer, TokenizerIdentity]:
    """The autoencoder to encode with (pinned, or this run's train_vqvae) and its identity."""
    if cfg.tokenize.checkpoint:
        pinned = pinned_tokenizer(cfg)
        return pinned, pinned.identity
    upstream = require_manifest(cfg.output_dir, TrainVQVAEManifest)
    _check_upstream(upstream, cfg.data.size_hw, cfg.data.channels)
    trained = read_tokenizer(upstream.checkpoint)
    identity = trained.identity
    if upstream.registered_model:
        name, _, version = upstream.registered_model[len("models:/") :].partition("/")
        identity = identity.model_copy(update={"model_name": name, "model_version": version})
    return trained, identity


def _external_inputs(cfg: Any) -> dict[str, str]:
    """A pinned tokenizer's sha256 (read and checked: a bad one fails before any write)."""
    if not cfg.tokenize.checkpoint:
        return {}
    return {"tokenizer": pinned_tokenizer(cfg).identity.sha256}


def _upstream_for(cfg: Any) -> tuple:
    return () if cfg.tokenize.checkpoint else (TrainVQVAEManifest,)


@dataclass(frozen=True)
class CodeLayout:
    """The tokenizer's code maps for the configured image size: levels in order, codebook sizes,
    map shapes and the stored dtypes."""

    levels: list[str]
    codebook_sizes: dict[str, int]
    shapes: dict[str, list[int]]  # level -> [h, w]
    dtypes: dict[str, str]  # level -> numpy dtype name

    @classmethod
    def of(cls, model: Any, size_hw: tuple[int, int]) -> CodeLayout:
        levels = list(model.levels)
        codebook_sizes = dict(zip(levels, (int(k) for k in model.codebook_sizes)))
        return cls(
            levels=levels,
            codebook_sizes=codebook_sizes,
            shapes={
                level: [int(h), int(w)] for level, (h, w) in zip(levels, model.code_shape(*size_hw))
            },
            dtypes={level: code_dtype(codebook_sizes[level]).name for level in levels},
        )

    def codes_per_image(self) -> int:
        return sum(h * w for h, w in (self.shapes[level] for level in self.levels))


class StageTables(NamedTuple):
    """The files written beside the shards once every shard is in (URIs; removed may be "")."""

    bad_inputs: str
    removed: str
    wids_index: str


def _log_params(
    ctx: StageContext, layout: CodeLayout, identity: TokenizerIdentity, corpus_name: str
) -> None:
    ctx.tracking.log_params(
        {
            ctx.stage: ctx.cfg.tokenize.model_dump(),
            "levels": layout.levels,
            "code_dtypes": layout.dtypes,
            "checkpoint": identity.checkpoint,
            "tokenizer_sha256": identity.sha256,
            "corpus_name": corpus_name,
        }
    )


def _live_samples(shards: Iterable[StoredShard]) -> int:
    return sum(s.entry.samples - s.entry.removed for s in shards)


def _report_resumed(shards: dict[str, StoredShard], removed: list[tuple[str, str]]) -> int:
    """Log what an earlier run finished; returns its live samples."""
    resumed = _live_samples(shards.values())
    if shards:
        log.info(
            "tokenize: keeping %d finished shard(s) with %d samples, %d removed from the corpus",
            len(shards),
            resumed,
            len(removed),
        )
    return resumed


def _encode_new(
    ctx: StageContext,
    corpus: Corpus,
    tokenizer: PinnedTokenizer,
    layout: CodeLayout,
    skip_ref: Any,
    shards: dict[str, StoredShard],
    resumed: int,
) -> tuple[list[dict[str, str]], int, float]:
    """Encode the images not yet in a shard into new shards, added to ``shards`` (the finished
    ones, whose ``resumed`` live samples ``skip_ref`` skips); returns the bad inputs, the samples
    written and the seconds it took."""
    start = time.perf_counter()
    # Folder corpora list one file per image; tar and Parquet corpora count their images as
    # they are read.
    total = len(corpus.files) - resumed if corpus.format == "folder" else None
    with console.current().progress("tokenize", total, "images") as progress:
        ds = _encode_and_write(ctx, corpus, tokenizer, layout.dtypes, skip_ref)
        bad, new_samples = _collect(ds, shards, progress)
    return bad, new_samples, time.perf_counter() - start


def _write_tables(
    stage_dir: str,
    bad: list[dict[str, str]],
    removed: list[tuple[str, str]],
    listed: list[StoredShard],
) -> StageTables:
    return StageTables(
        bad_inputs=_write_bad_table(stage_dir, bad),
        removed=_write_removed(stage_dir, removed),
        wids_index=write_wids_index(stage_dir, [s.entry for s in listed]),
    )


def _metrics(
    listed: list[StoredShard],
    layout: CodeLayout,
    *,
    new_samples: int,
    resumed: int,
    removed: int,
    bad: int,
    seconds: float,
) -> dict[str, float]:
    samples = _live_samples(listed)
    total_bytes = sum(s.entry.bytes for s in listed)
    return {
        "samples": samples,
        "new_samples": new_samples,
        "resumed_samples": resumed,
        "removed_samples": removed,
        "bad_inputs": bad,
        "shards": len(listed),
        "seconds": seconds,
        "images_per_second": new_samples / seconds if seconds > 0 else 0.0,
        "bytes_per_image": total_bytes / samples if samples else 0.0,
        "bytes_per_image_int64": 8.0 * layout.codes_per_image(),
    }


def _log_summary(metrics: dict[str, float]) -> None:
    log.info(
        "tokenize: %d samples in %d shards (%d new, %d removed, %.1f images/s, %.0f bytes/image), "
        "%d bad inputs",
        metrics["samples"],
        metrics["shards"],
        metrics["new_samples"],
        metrics["removed_samples"],
        metrics["images_per_second"],
        metrics["bytes_per_image"],
        metrics["bad_inputs"],
    )


def _manifest(
    cfg: Any,
    layout: CodeLayout,
    listed: list[StoredShard],
    class_names: list[str],
    identity: TokenizerIdentity,
    corpus_name: str,
    tables: StageTables,
    removed: int,
    bad: list[dict[str, str]],
    metrics: dict[str, float],
) -> TokenizeManifest:
    samples = _live_samples(listed)
    validation = sum(s.validation for s in listed)
    test = sum(s.test for s in listed)
    return TokenizeManifest(
        shards=[s.entry for s in listed],
        samples=samples,
        splits={"train": samples - validation - test, "validation": validation, "test": test},
        levels=layout.levels,
        code_shapes=layout.shapes,
        code_dtypes=layout.dtypes,
        codebook_sizes=layout.codebook_sizes,
        class_names=class_names,
        labelled=bool(class_names),
        checkpoint=identity.checkpoint,
        tokenizer=identity,
        corpus_name=corpus_name,
        validation_fraction=cfg.data.validation_fraction,
        test_fraction=cfg.data.test_fraction,
        removed_table=tables.removed,
        removed=removed,
        wids_index=tables.wids_index,
        image_size=list(cfg.data.size_hw),
        channels=cfg.data.channels,
        bad_inputs=BadInputs(
            count=len(bad),
            keys=[b["key"] for b in bad[:BAD_KEYS_IN_MANIFEST]],
            table=tables.bad_inputs,
        ),
        metrics=metrics,
    )


def run(ctx: StageContext) -> TokenizeManifest:
    """Tokenize the corpus into code shards; returns the stage's manifest."""
    cfg = ctx.cfg
    tokenizer, identity = _tokenizer(cfg)
    layout = CodeLayout.of(tokenizer.model, cfg.data.size_hw)
    fractions = (cfg.data.validation_fraction, cfg.data.test_fraction)
    corpus_name = cfg.tokenize.corpus_name or default_corpus_name(cfg.data.source)
    _log_params(ctx, layout, identity, corpus_name)

    corpus, present = in_key_hash_order(open_corpus(cfg.data))
    ctx.tracking.log_params(
        {"corpus_labels": f"{len(corpus.class_names)} classes" if corpus.labelled else "unlabelled"}
    )
    if not corpus.labelled:
        log.info("tokenize: the corpus is unlabelled; the code shards carry no class")
    skip_ref, shards, removed = _finished_work(ctx.stage_dir, present, corpus.format, fractions)
    resumed = _report_resumed(shards, removed)
    bad, new_samples, seconds = _encode_new(
        ctx, corpus, tokenizer, layout, skip_ref, shards, resumed
    )
    _reconcile(ctx.stage_dir, shards, present, corpus.format, fractions)

    bad.sort(key=lambda b: b["key"])
    listed = [shards[name] for name in sorted(shards)]
    tables = _write_tables(ctx.stage_dir, bad, removed, listed)
    metrics = _metrics(
        listed,
        layout,
        new_samples=new_samples,
        resumed=resumed,
        removed=len(removed),
        bad=len(bad),
        seconds=seconds,
    )
    ctx.tracking.log_metrics(metrics)
    _log_summary(metrics)
    return _manifest(
        cfg,
        layout,
        listed,
        class_names=list(corpus.class_names),
        identity=identity,
        corpus_name=corpus_name,
        tables=tables,
        removed=len(removed),
        bad=bad,
        metrics=metrics,
    )


# The command line: `vqpipe tokenize --checkpoint CKPT --input CORPUS --output DIR` encodes a corpus
# with a pinned autoencoder and needs no config file. With CONFIG the three options set their keys
# and --set still has the last word.
_OPTION_KEYS = {"checkpoint": "tokenize.checkpoint", "input": "data.source", "output": "output_dir"}


def _cli_options(parser: argparse.ArgumentParser) -> None:
    """tokenize's options beside CONFIG, --set and --force."""
    parser.add_argument(
        "--checkpoint",
        help="pinned autoencoder: checkpoint path or URL, or models:/<name>/<version or "
        "@alias>; sets tokenize.checkpoint",
    )
    parser.add_argument("--input", help="the corpus to encode; sets data.source")
    parser.add_argument("--output", help="where the code dataset goes; sets output_dir")
    parser.epilog = (
        "Without CONFIG, --checkpoint, --input and --output are required and the rest of "
        "the configuration takes its defaults, with data.image_size and data.channels "
        "read from the checkpoint (unless --set)."
    )


def _config_from_args(args: argparse.Namespace) -> PipelineConfig:
    """The configuration of ``vqpipe tokenize``: CONFIG with the options before --set, or none."""
    if args.config is None:
        return _config_from_checkpoint(args)
    options = [
        f"{key}={getattr(args, name)}" for name, key in _OPTION_KEYS.items() if getattr(args, name)
    ]
    return load_config(args.config, [*options, *args.overrides])


def _config_from_checkpoint(args: argparse.Namespace) -> PipelineConfig:
    """Defaults, the three options, the image size and channels of the checkpoint, then --set."""
    missing = [f"--{name}" for name in _OPTION_KEYS if not getattr(args, name)]
    if missing:
        raise ConfigError(
            f"vqpipe tokenize needs a CONFIG file, or --checkpoint, --input and --output "
            f"(missing: {', '.join(missing)})"
        )
    raw = {
        "output_dir": args.output,
        "data": {"source": args.input},
        "tokenize": {"checkpoint": args.checkpoint},
    }
    draft = parse_config(raw, args.overrides)
    pinned = read_tokenizer(draft.tokenize.checkpoint, tracking_uri_for(draft))
    if pinned.image_size is not None:
        raw["data"]["image_size"] = list(pinned.image_size)
    raw["data"]["channels"] = pinned.channels
    return parse_config(raw, args.overrides)


SPEC = StageSpec(
    manifest=TokenizeManifest,
    run=run,
    description="encode the corpus into WebDataset shards of codes with Ray Data",
    upstream=(TrainVQVAEManifest,),
    sections=("data",),
    reads_corpus=True,
    on_corpus_change="incremental",
    upstream_for=_upstream_for,
    external_inputs=_external_inputs,
    cli_options=_cli_options,
    config_from_args=_config_from_args,
)
