"""Sample keys, and everything decided by a key alone: its split and its place in hash order.

A key names one image for as long as the corpus does (``pipelines.data.corpus`` says how each layout
makes them). Decisions that must not depend on the order rows arrive in, or on which images were
added later, are functions of the key: the train/validation/test split, the class-blind subsets
used for metrics, and the compact hash sets that let a resumed tokenize skip finished images.

Three splits, one job each: ``train`` fits the models; ``validation`` picks checkpoints (the best
prior, the training stages' held-out curves); ``test`` gives the figures the report and the
manifests publish, and nothing is ever selected on it, so those figures are not optimistic.
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


SPLITS = ("train", "validation", "test")


def _unit_hash(key: str) -> float:
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2.0**64


def check_split_fractions(validation_fraction: float, test_fraction: float) -> None:
    for name, value in (("validation", validation_fraction), ("test", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"the {name} fraction must be in [0, 1), got {value}")
    if validation_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"validation fraction {validation_fraction} + test fraction {test_fraction} leave no "
            "training images; their sum must be below 1"
        )


def split_of(key: str, validation_fraction: float, test_fraction: float) -> str:
    """ "test", "validation" or "train" for ``key``: deterministic fractions of the key space.

    The split is a function of the key alone, so it is the same in every stage and every run,
    and images added to a corpus later never move existing ones between splits. Test takes the
    lowest hashes, validation the next band, so changing the validation fraction never moves a
    key into or out of the test split.
    """
    check_split_fractions(validation_fraction, test_fraction)
    return split_of_hash(_unit_hash(key), validation_fraction, test_fraction)


def split_of_hash(unit_hash: float, validation_fraction: float, test_fraction: float) -> str:
    """The split of a key whose ``unit_hashes`` value is ``unit_hash`` (see ``split_of``)."""
    if unit_hash < test_fraction:
        return "test"
    if unit_hash < test_fraction + validation_fraction:
        return "validation"
    return "train"


def unit_hashes(keys: Iterable[str]) -> np.ndarray:
    """Each key's position in [0, 1) that ``split_of`` compares with the fractions (float64).

    Stored beside decoded images so a reader picks a split with one vectorised comparison.
    """
    return np.fromiter((_unit_hash(k) for k in keys), dtype=np.float64)


def split_mask(
    hashes: np.ndarray, split: str, validation_fraction: float, test_fraction: float
) -> np.ndarray:
    """Which rows of ``unit_hashes`` fall in ``split`` ("all" keeps every row)."""
    if split == "all":
        return np.ones(len(hashes), dtype=bool)
    if split == "test":
        return hashes < test_fraction
    if split == "validation":
        return (hashes >= test_fraction) & (hashes < test_fraction + validation_fraction)
    if split == "train":
        return hashes >= test_fraction + validation_fraction
    raise ValueError(f"split must be one of {(*SPLITS, 'all')}, got {split!r}")


def key_hash(key: str) -> int:
    """A 64-bit hash of ``key``: the order of ``smallest_by_key_hash`` and of ``key_hashes``."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


_key_hash = key_hash


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
