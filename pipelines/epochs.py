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
finish, so the batches, and hence the model, change with the machine's load. Here a batch is a
function of (data, seed, epoch, rank, world size) alone, which makes a run reproducible and lets a
resumed run skip exactly the batches it had already trained on. Units are small (64-row row
groups; shards read 16 at a time), so a permutation of them plus the buffer mixes classes even
when the corpus is stored class by class; ``benchmarks/bench_shuffle.py`` measures it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipelines.image_cache import ImageCache, RowGroup, read_row_group
from pipelines.keys import split_mask, unit_hashes

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
    shuffle_buffer: int = 2048
    interleave: int = 16
    image_shape: tuple[int, int, int] | None = None  # image_cache only
    levels: tuple[str, ...] = ()  # code_shards only
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
    ) -> EpochReader:
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
    ) -> EpochReader:
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
            rows = read_row_group(unit, self.image_shape)
            keep = split_mask(
                rows["unit_hash"], self.split, self.validation_fraction, self.test_fraction
            )
            rows = {c: rows[c][keep] for c in self.columns}
            for start in range(0, len(keep), CHUNK_ROWS):
                chunk = {c: v[start : start + CHUNK_ROWS] for c, v in rows.items()}
                if len(next(iter(chunk.values()))):
                    yield chunk
            return
        from pipelines.shards import iter_code_samples

        pending: list[dict] = []
        for sample in iter_code_samples([unit.uri], list(self.levels)):
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
        rng = np.random.default_rng([self.seed, epoch, rank, 1])
        # Half the buffer is handed out at each refill and half kept, so rows stay a while and
        # mix with later reads; at least two batches, so every refill yields one.
        capacity = max(self.shuffle_buffer, 2 * batch_size) if self.shuffle else batch_size
        pool: list[dict[str, np.ndarray]] = []
        pooled = 0
        for chunk in self.chunks(epoch, rank, world_size):
            pool.append(chunk)
            pooled += len(next(iter(chunk.values())))
            if pooled < capacity:
                continue
            rows = _concat(pool, rng if self.shuffle else None)
            keep = capacity // 2 if self.shuffle else 0
            out = (pooled - keep) // batch_size * batch_size
            for start in range(0, out, batch_size):
                yield {c: v[start : start + batch_size] for c, v in rows.items()}
            pool = [{c: v[out:] for c, v in rows.items()}]
            pooled -= out
        if pooled:
            rows = _concat(pool, rng if self.shuffle else None)
            for start in range(0, pooled, batch_size):
                yield {c: v[start : start + batch_size] for c, v in rows.items()}


def _concat(
    pool: list[dict[str, np.ndarray]], rng: np.random.Generator | None
) -> dict[str, np.ndarray]:
    """The pooled rows as one (shuffled) array per column (fresh arrays, safe to hand to torch)."""
    columns = pool[0].keys()
    merged = {c: np.concatenate([p[c] for p in pool]) for c in columns}
    if rng is None:
        return merged
    order = rng.permutation(len(next(iter(merged.values()))))
    return {c: v[order] for c, v in merged.items()}
