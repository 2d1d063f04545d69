"""What a training worker reads each epoch: a seeded, per-rank, order-preserving reader.

Every training read goes through ``EpochReader.batches(epoch, rank, world_size, batch_size)``:

1. the read units (row groups of the decoded-image cache, or code shards) are permuted with a
   generator seeded by (seed, epoch), the same permutation on every rank;
2. rank r reads units r, r + W, r + 2W, ... of that permutation (when there are fewer units than
   ranks, every rank reads every unit and keeps every W-th row instead), ``interleave`` units at a
   time, round-robin in chunks of at most ``CHUNK_ROWS`` rows;
3. a shuffle buffer of ``shuffle_buffer`` rows, seeded by (seed, epoch, rank), mixes what was read
   and hands out batches.

Why not Ray Data's ``streaming_split``: it hands blocks to training workers in whatever order they
finish, so the batches, and hence the model, change with the machine's load. Ray Data with
``preserve_order`` and an equal split would fix the order, but through a coordinator actor and
read tasks that compete with training for the CPUs. Here each worker reads its own units with
pyarrow, so a batch is a function of (data, seed, epoch, rank, world size) alone: a run is
reproducible, a resumed run skips exactly the batches it had already trained on, and training
needs no CPUs set aside for data tasks. Units are small (64-row row
groups; shards read 16 at a time), so a permutation of them plus the buffer mixes classes even
when the corpus is stored class by class; ``benchmarks/bench_shuffle.py`` measures it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from pipelines.config import AugmentSection
from pipelines.data.augment import augment_batch
from pipelines.data.image_cache import ImageCache, RowGroup, read_row_group
from pipelines.data.keys import split_mask, unit_hashes

CHUNK_ROWS = 64


@dataclass(frozen=True)
class EpochReader:
    """A training split, read per rank and per epoch (see the module docstring); picklable."""

    source: Literal["image_cache", "code_shards"]
    units: tuple[RowGroup, ...]
    columns: tuple[str, ...]
    split: str
    validation_fraction: float
    test_fraction: float
    seed: int
    shuffle_buffer: int  # the training section's shuffle_buffer
    interleave: int = 16
    image_shape: tuple[int, int, int] | None = None  # image_cache only
    encoding: str = "pixels"  # image_cache only: how the cache stores images
    # image_cache only: random crops and flips of the "image" column (the train split's reader)
    augment: AugmentSection | None = None
    levels: tuple[str, ...] = ()  # code_shards only
    # code_shards only: shard URI -> keys stored in it that no longer belong to the corpus
    removed: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # code_shards only: shard URI -> new label of each stored label, for shards of several
    # corpora trained on together (classes merged by name); shards not listed keep their labels
    label_maps: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    # code_shards only: False for the shards of an unlabelled corpus (no .cls; labels are -1)
    labelled: bool = True
    # Off only to measure what shuffling costs (benchmarks/bench_shuffle.py): units in stored
    # order, no buffer.
    shuffle: bool = True

    @classmethod
    def for_images(
        cls,
        cache: ImageCache,
        split: str,
        *,
        validation_fraction: float,
        test_fraction: float,
        seed: int,
        shuffle_buffer: int,
        columns: tuple[str, ...] = ("image",),
        augment: AugmentSection | None = None,
    ) -> EpochReader:
        """``augment`` (when enabled) applies to the train split only: a reader of any other
        split refuses it."""
        if augment is not None and augment.enabled and split != "train":
            raise ValueError(f"augmentation applies to the train split only, not {split!r}")
        return cls(
            "image_cache",
            tuple(g for g in cache.row_groups if g.rows),
            columns,
            split,
            validation_fraction,
            test_fraction,
            seed,
            shuffle_buffer,
            image_shape=cache.image_shape,
            encoding=cache.encoding,
            augment=augment if augment is not None and augment.enabled else None,
        )

    @classmethod
    def for_code_shards(
        cls,
        shard_uris: list[str],
        levels: list[str],
        split: str,
        *,
        validation_fraction: float,
        test_fraction: float,
        seed: int,
        shuffle_buffer: int,
        columns: tuple[str, ...],
        removed: Mapping[str, frozenset[str]] | None = None,
        label_maps: Mapping[str, tuple[int, ...]] | None = None,
        labelled: bool = True,
    ) -> EpochReader:
        """``removed``: shard name (``CodeShards.removed_keys()``) or URI -> stored keys to skip;
        ``label_maps``: shard URI -> the label each stored label becomes; ``labelled`` false: the
        shards of an unlabelled corpus, whose samples have label -1."""
        removed = removed or {}
        by_uri = {}
        for uri in shard_uris:
            skip = removed.get(uri, removed.get(uri.rsplit("/", 1)[-1]))
            if skip:
                by_uri[uri] = frozenset(skip)
        return cls(
            "code_shards",
            tuple(RowGroup(uri, -1, 0) for uri in sorted(shard_uris)),
            columns,
            split,
            validation_fraction,
            test_fraction,
            seed,
            shuffle_buffer,
            levels=tuple(levels),
            removed=by_uri,
            label_maps={uri: tuple(m) for uri, m in (label_maps or {}).items()},
            labelled=labelled,
        )

    # ---------------------------------------------------------------------------------------------

    def epoch_units(self, epoch: int, rank: int, world_size: int) -> tuple[list[RowGroup], int]:
        """(the units rank reads this epoch, in order; the row stride: 1, or world_size when
        every rank reads every unit)."""
        order = np.arange(len(self.units))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))
        permuted = [self.units[i] for i in order]
        if len(permuted) >= world_size:
            return permuted[rank::world_size], 1
        return permuted, world_size

    def _unit_chunks(self, unit: RowGroup) -> Iterator[dict[str, np.ndarray]]:
        """The rows of one unit in stored order, in chunks, with the split already applied."""
        if self.source == "image_cache":
            assert self.image_shape is not None
            rows = read_row_group(unit, self.image_shape, self.encoding)
            keep = split_mask(
                rows["unit_hash"], self.split, self.validation_fraction, self.test_fraction
            )
            rows = {c: rows[c][keep] for c in self.columns}
            for start in range(0, len(keep), CHUNK_ROWS):
                chunk = {c: v[start : start + CHUNK_ROWS] for c, v in rows.items()}
                if len(next(iter(chunk.values()))):
                    yield chunk
            return
        from pipelines.data.shards import iter_code_samples

        pending: list[dict] = []
        removed = self.removed.get(unit.uri, frozenset())
        label_map = self.label_maps.get(unit.uri)
        for sample in iter_code_samples([unit.uri], list(self.levels), labelled=self.labelled):
            if sample["key"] in removed:
                continue
            if label_map is not None:
                sample["label"] = label_map[sample["label"]]
            pending.append(sample)
            if len(pending) == CHUNK_ROWS:
                yield from self._code_chunk(pending)
                pending = []
        if pending:
            yield from self._code_chunk(pending)

    def _code_chunk(self, samples: list[dict]) -> Iterator[dict[str, np.ndarray]]:
        keep = split_mask(
            unit_hashes(s["key"] for s in samples),
            self.split,
            self.validation_fraction,
            self.test_fraction,
        )
        kept = [s for s, k in zip(samples, keep) if k]
        if kept:
            yield {
                c: np.stack([s[c] for s in kept])
                if c in self.levels
                else np.array([s[c] for s in kept], dtype=object if c == "key" else np.int64)
                for c in self.columns
            }

    def chunks(self, epoch: int, rank: int, world_size: int) -> Iterator[dict[str, np.ndarray]]:
        """This rank's rows of ``epoch`` before the shuffle buffer: ``interleave`` units at a
        time, one chunk from each in turn."""
        units, stride = self.epoch_units(epoch, rank, world_size)
        pending = iter(units)
        active: list[tuple[Iterator[dict[str, np.ndarray]], list[int]]] = []
        while True:
            while len(active) < self.interleave:
                unit = next(pending, None)
                if unit is None:
                    break
                active.append((self._unit_chunks(unit), [0]))
            if not active:
                return
            still = []
            for chunks, seen in active:
                chunk = next(chunks, None)
                if chunk is None:
                    continue
                still.append((chunks, seen))
                n = len(next(iter(chunk.values())))
                if stride > 1:
                    # Row i of a unit goes to rank i mod W: disjoint, and together complete.
                    index = np.arange(seen[0], seen[0] + n)
                    chunk = {c: v[index % stride == rank] for c, v in chunk.items()}
                seen[0] += n
                if len(next(iter(chunk.values()))):
                    yield chunk
            active = still

    def batches(
        self, epoch: int, rank: int, world_size: int, batch_size: int
    ) -> Iterator[dict[str, np.ndarray]]:
        """Shuffled batches of this rank's rows of ``epoch``; the last one may be smaller."""
        batches = self._shuffled(epoch, rank, world_size, batch_size)
        if self.augment is None:
            yield from batches
            return
        for index, batch in enumerate(batches):
            # Seeded per batch, so skipping batches (a resumed run) changes none of the others.
            rng = np.random.default_rng([self.seed, epoch, rank, index, 2])
            yield {**batch, "image": augment_batch(batch["image"], self.augment, rng)}

    def _shuffled(
        self, epoch: int, rank: int, world_size: int, batch_size: int
    ) -> Iterator[dict[str, np.ndarray]]:
        chunks = self.chunks(epoch, rank, world_size)
        if not self.shuffle:
            yield from _in_order(chunks, batch_size)
            return
        rng = np.random.default_rng([self.seed, epoch, rank, 1])
        buffer = _ShuffleBuffer(max(self.shuffle_buffer, 2 * batch_size), rng)
        for chunk in chunks:
            buffer.add(chunk)
            if buffer.size >= buffer.capacity:
                yield from buffer.take(batch_size, keep=buffer.capacity // 2)
        yield from buffer.take(batch_size, keep=0)


class _ShuffleBuffer:
    """A pool of row slots that chunks are copied into and shuffled batches are drawn from.

    When full, the live rows are permuted once, batches are gathered from the front of the
    permutation and the last ``keep`` rows (half the pool) stay for the next round, so a row can
    leave long after it arrived and mix with rows read later. A row is copied twice, into a free
    slot and out with its batch; rows that stay are never moved.
    """

    def __init__(self, capacity: int, rng: np.random.Generator):
        self.capacity, self.rng = capacity, rng
        self.store: dict[str, np.ndarray] = {}
        self.live = np.empty(0, dtype=np.int64)  # slots holding rows, in arrival order
        self.free = np.empty(0, dtype=np.int64)

    @property
    def size(self) -> int:
        return len(self.live)

    def add(self, chunk: dict[str, np.ndarray]) -> None:
        n = len(next(iter(chunk.values())))
        if n > len(self.free):
            # A chunk arrives only while size < capacity: capacity + one chunk of slots suffice.
            old = len(next(iter(self.store.values()))) if self.store else 0
            rows = max(self.capacity + n, old + n - len(self.free))
            self.store = {c: _grown(self.store.get(c), old, rows, v) for c, v in chunk.items()}
            self.free = np.concatenate([self.free, np.arange(old, rows)])
        slots, self.free = self.free[:n], self.free[n:]
        for c, v in chunk.items():
            self.store[c][slots] = v
        self.live = np.concatenate([self.live, slots])

    def take(self, batch_size: int, keep: int) -> Iterator[dict[str, np.ndarray]]:
        """Shuffled batches of all but ``keep`` rows (all rows, the last batch partial, when
        ``keep`` is 0)."""
        order = self.live[self.rng.permutation(self.size)]
        out = self.size if keep == 0 else (self.size - keep) // batch_size * batch_size
        for start in range(0, out, batch_size):
            picked = order[start : min(start + batch_size, out)]
            yield {c: v[picked] for c, v in self.store.items()}
        self.free = np.concatenate([self.free, order[:out]])
        self.live = order[out:]


def _grown(old: np.ndarray | None, used: int, rows: int, like: np.ndarray) -> np.ndarray:
    new = np.empty((rows, *like.shape[1:]), like.dtype)
    if old is not None and used:
        new[:used] = old[:used]
    return new


def _in_order(
    chunks: Iterator[dict[str, np.ndarray]], batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of the rows in the order read (no shuffle)."""
    pending: list[dict[str, np.ndarray]] = []
    pooled = 0
    for chunk in chunks:
        pending.append(chunk)
        pooled += len(next(iter(chunk.values())))
        if pooled >= batch_size:
            rows = {c: np.concatenate([p[c] for p in pending]) for c in pending[0]}
            full = pooled // batch_size * batch_size
            for start in range(0, full, batch_size):
                yield {c: v[start : start + batch_size] for c, v in rows.items()}
            pending = [{c: v[full:] for c, v in rows.items()}]
            pooled -= full
    if pooled:
        rows = {c: np.concatenate([p[c] for p in pending]) for c in pending[0]}
        yield rows
