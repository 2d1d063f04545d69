"""Sample keys, and everything decided by a key alone: its split and its place in hash order.

A key names one image for as long as the corpus does (``pipelines.corpus`` says how each layout
makes them). Decisions that must not depend on the order rows arrive in, or on which images were
added later, are functions of the key: the train/holdout split, the class-blind subsets used for
metrics, and the compact hash sets that let a resumed tokenize skip finished images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import numpy as np


def sanitize_key(raw: str) -> str:
    """A WebDataset-safe version of ``raw``: "/"-separated, no dot in the last component.

    WebDataset splits a member name at the first dot of its last component into key and
    extension, so ``img.v2`` would become key ``img`` with extension ``v2.png``. Dots there become
    underscores, and because that could make two names equal (``a.b`` and ``a_b``), a short hash of
    the original name is appended whenever a dot was replaced. Dots in folder names are harmless
    and kept; backslashes become "/", and empty, "." and ".." components are dropped.
    """
    parts = [p for p in raw.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    if not parts:
        raise ValueError(f"cannot make a key from {raw!r}")
    last = parts[-1]
    if "." in last:
        parts[-1] = f"{last.replace('.', '_')}-{hashlib.sha1(raw.encode()).hexdigest()[:8]}"
    return "/".join(parts)


def _unit_hash(key: str) -> float:
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2.0**64


def split_of(key: str, fraction: float) -> str:
    """Return "holdout" for a deterministic ``fraction`` of keys and "train" for the rest.

    The split is a function of the key alone, so it is the same in every stage and every run,
    and images added to a corpus later never move existing ones between splits.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    return "holdout" if _unit_hash(key) < fraction else "train"


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def smallest_by_key_hash(items: Iterable[tuple[str, Any]], limit: int) -> list[tuple[str, Any]]:
    """The ``limit`` (key, item) pairs with the smallest key hashes, in hash order.

    A deterministic, class-blind subset that does not depend on the order rows arrive in (the
    first rows of a folder corpus are all of its first class). Streams: at most about twice
    ``limit`` items are held at once.
    """
    if limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    kept: list[tuple[int, str, Any]] = []
    for key, item in items:
        kept.append((_key_hash(key), key, item))
        if len(kept) > 2 * limit:
            kept.sort(key=lambda entry: entry[0])
            del kept[limit:]
    kept.sort(key=lambda entry: entry[0])
    return [(key, item) for _, key, item in kept[:limit]]


def key_hashes(keys: Iterable[str]) -> np.ndarray:
    """64-bit hashes of keys as a sorted uint64 array: a compact set for ``skip_keys``.

    Eight bytes a key instead of a Python string: a million finished keys ship to every reader
    task as 8 MB. The chance that any two of a million keys collide is below 1e-7.
    """
    return np.unique(np.fromiter((_key_hash(k) for k in keys), dtype=np.uint64))


def in_key_set(sorted_hashes: np.ndarray, keys: list[str]) -> np.ndarray:
    if len(sorted_hashes) == 0 or not keys:
        return np.zeros(len(keys), dtype=bool)
    probe = np.array([_key_hash(k) for k in keys], dtype=np.uint64)
    pos = np.clip(np.searchsorted(sorted_hashes, probe), 0, len(sorted_hashes) - 1)
    return sorted_hashes[pos] == probe
