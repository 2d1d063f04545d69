"""Golden values: what stored data and a corpus' splits depend on, written down as literals.

A key's split, its place in hash order, the tokenize manifest, the shards' member names and the
bytes of a stored code map must never change by accident: a user who adds images relies on old
ones keeping their split, and a reader of last year's shards relies on their bytes meaning the
same. Each expected value lives in ``tests/golden/``; changing one is a deliberate edit of that
file, with a version bump of the format whose stored data changes meaning (the manifest's
``version``, the shards' layout in ``pipelines.data.shards``).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from pipelines.config import DataSection, parse_config
from pipelines.data.keys import (
    check_split_fractions,
    in_key_set,
    key_hash,
    key_hashes,
    sanitize_key,
    smallest_by_key_hash,
    split_mask,
    split_of,
    split_of_hash,
    unit_hashes,
)
from pipelines.runner import run_stages
from pipelines.stage_manifests import TokenizeManifest
from tests.pipelines.conftest import tiny_raw_config
from vq_core.checkpoint import load_checkpoint, save_checkpoint

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
GOLDEN_CHECKPOINT = (
    Path(__file__).resolve().parent.parent / "vq_core" / "data" / "vqvae2_two_level_v1.pt"
)
CLASSES = ("disc", "stripe")
PER_CLASS = 5
SIZE = 32


def golden(name: str) -> dict:
    return json.loads((GOLDEN / name).read_text())


# ------------------------------------------------------------------------------------- keys


def fixed_keys(spec: dict) -> list[str]:
    return [f"{c}/{i:05d}" for c in spec["classes"] for i in range(spec["per_class"])]


def test_split_of_fixed_keys_at_the_default_fractions():
    spec = golden("splits.json")
    defaults = DataSection.model_fields
    assert defaults["validation_fraction"].default == spec["validation_fraction"]
    assert defaults["test_fraction"].default == spec["test_fraction"]
    keys = fixed_keys(spec)
    expected = {k: "train" for k in keys}
    expected |= {k: "validation" for k in spec["validation"]}
    expected |= {k: "test" for k in spec["test"]}
    fractions = (spec["validation_fraction"], spec["test_fraction"])
    assert {k: split_of(k, *fractions) for k in keys} == expected
    # The readers' vectorised path (split_mask over stored unit hashes) gives the same splits.
    hashes = unit_hashes(keys)
    for split in ("train", "validation", "test"):
        chosen = [k for k, keep in zip(keys, split_mask(hashes, split, *fractions)) if keep]
        assert chosen == [k for k in keys if expected[k] == split], split


def test_key_hashes_and_sanitized_keys():
    spec = golden("splits.json")
    assert {k: key_hash(k) for k in spec["key_hash"]} == spec["key_hash"]
    assert {raw: sanitize_key(raw) for raw in spec["sanitize_key"]} == spec["sanitize_key"]


def _independent_unit_hash(key: str) -> float:
    """The documented position of a key in [0, 1): the first 8 bytes of its sha1, big-endian."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:16], 16) / 2.0**64


def _independent_key_hash(key: str) -> int:
    return int(hashlib.blake2b(key.encode(), digest_size=8).hexdigest(), 16)


def test_split_bands_are_half_open_test_first_then_validation():
    # [0, test) is test, [test, test + validation) validation, the rest train: a hash exactly on
    # a boundary belongs to the band above it, in the scalar and in the vectorised path.
    t, v = 0.25, 0.5
    hashes = np.array([0.0, 0.2, 0.25, 0.5, 0.75, 0.9])
    expected = ["test", "test", "validation", "validation", "train", "train"]
    assert [split_of_hash(h, v, t) for h in hashes] == expected
    for split in ("train", "validation", "test"):
        mask = split_mask(hashes, split, v, t)
        assert mask.tolist() == [e == split for e in expected], split
    everything = split_mask(hashes, "all", v, t)
    assert everything.dtype == np.bool_ and everything.tolist() == [True] * len(hashes)
    with pytest.raises(
        ValueError, match=r"split must be one of \('train', 'validation', 'test', 'all'\)"
    ):
        split_mask(hashes, "ALL", v, t)
    keys = [f"img{i}" for i in range(50)]
    assert unit_hashes(keys).dtype == np.float64
    assert unit_hashes(keys).tolist() == [_independent_unit_hash(k) for k in keys]


def test_split_fractions_are_checked_with_a_message_naming_the_fraction():
    for validation, test in ((0.0, 0.0), (0.5, 0.49), (0.999, 0.0), (0.0, 0.999)):
        check_split_fractions(validation, test)
    for validation, test, message in (
        (-0.1, 0.2, r"the validation fraction must be in \[0, 1\), got -0.1"),
        (1.0, 0.0, r"the validation fraction must be in \[0, 1\), got 1.0"),
        (0.2, -0.1, r"the test fraction must be in \[0, 1\), got -0.1"),
        (0.0, 1.0, r"the test fraction must be in \[0, 1\), got 1.0"),
        (
            0.5,
            0.5,
            r"validation fraction 0.5 \+ test fraction 0.5 leave no training images; their "
            r"sum must be below 1",
        ),
        (0.9, 0.3, "leave no training images"),
    ):
        with pytest.raises(ValueError, match=message):
            check_split_fractions(validation, test)
        with pytest.raises(ValueError, match=message):
            split_of("a/key", validation, test)


def test_a_key_is_made_of_its_non_empty_path_components():
    assert sanitize_key("/a//b/./c/") == "a/b/c"
    assert sanitize_key("a\\..\\b") == "a/b"
    for raw in ("", "/", "./..", "\\"):
        with pytest.raises(ValueError, match=re.escape(f"cannot make a key from {raw!r}")):
            sanitize_key(raw)


def test_hash_order_subsets_and_key_sets_follow_the_blake2b_hash():
    keys = [f"class{i % 3}/{i:04d}" for i in range(40)]
    by_hash = sorted(keys, key=_independent_key_hash)
    items = [(k, i) for i, k in enumerate(keys)]
    # The smallest hashes, in hash order, whatever the arrival order and however often the
    # streaming buffer (twice the limit) is pruned.
    for limit in (1, 3, 7, 40, 100):
        expected = [(k, keys.index(k)) for k in by_hash[:limit]]
        assert smallest_by_key_hash(items, limit) == expected, limit
        assert smallest_by_key_hash(list(reversed(items)), limit) == expected, limit
    with pytest.raises(ValueError, match="limit must be positive, got 0"):
        smallest_by_key_hash(items, 0)
    # A finished-key set: sorted unique uint64 hashes; membership is exact for these keys.
    done = keys[:10] + keys[:3]
    stored = key_hashes(done)
    assert stored.dtype == np.uint64
    assert stored.tolist() == sorted({_independent_key_hash(k) for k in done})
    probe = keys[5:15] + ["never/seen"]
    assert in_key_set(stored, probe).tolist() == [k in done for k in probe]
    # Hashes above and below every stored one are outside the set too.
    assert in_key_set(key_hashes([by_hash[20]]), by_hash).tolist() == [
        k == by_hash[20] for k in by_hash
    ]
    assert in_key_set(stored, done).all()  # the smallest stored hash included
    for empty in (in_key_set(stored, []), in_key_set(key_hashes([]), probe)):
        assert empty.dtype == np.bool_ and not empty.any()  # a mask, usable as an index
    assert len(in_key_set(key_hashes([]), probe)) == len(probe)


# ---------------------------------------------------------------------------------- tokenize


def write_fixed_corpus(root: Path) -> str:
    """Ten 32x32 PNGs computed from their index alone (no random numbers): discs and stripes."""
    from PIL import Image

    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            colour = np.array([40 + 40 * i, 200 - 30 * i, 60 + 90 * c], dtype=np.float64)
            if name == "disc":
                inside = (ys - 8 - 3 * i) ** 2 + (xs - 20 + 2 * i) ** 2 <= (5 + i) ** 2
            else:
                inside = ((xs + ys * i) // (3 + i)) % 2 == 0
            image = np.where(inside[..., None], colour, 255 - colour).astype(np.uint8)
            Image.fromarray(image).save(root / name / f"{i:05d}.png")
    return str(root)


def pinned_tokenizer(path: Path) -> str:
    """The golden two-level checkpoint (tests/vq_core/data), with the image facts a pinned
    tokenizer carries."""
    model, _ = load_checkpoint(str(GOLDEN_CHECKPOINT))
    save_checkpoint(model, path, extra={"image_size": [SIZE, SIZE], "channels": 3})
    return str(path)


def tokenize_fixed_corpus(tmp_path: Path) -> TokenizeManifest:
    source = write_fixed_corpus(tmp_path / "corpus")
    raw = tiny_raw_config(str(tmp_path / "out"), source)
    raw["data"] |= {"image_size": SIZE, "validation_fraction": 0.2, "test_fraction": 0.2}
    raw["tokenize"] |= {"checkpoint": pinned_tokenizer(tmp_path / "tokenizer.pt")}
    return run_stages(parse_config(raw), stages=["tokenize"], run_name="golden")[
        "tokenize"
    ].manifest


def shard_contents(manifest: TokenizeManifest) -> tuple[dict, dict]:
    """Member names of each shard, and the sha256 of every member's bytes, read with tarfile."""
    import tarfile

    names, digests = {}, {}
    for shard in manifest.shards:
        with tarfile.open(shard.uri) as tar:
            members = tar.getmembers()
            names[shard.name] = [m.name for m in members]
            for m in members:
                digests[m.name] = hashlib.sha256(tar.extractfile(m).read()).hexdigest()
    return names, digests


@pytest.fixture(scope="module")
def fixed_tokenize(ray_local, tmp_path_factory):
    return tokenize_fixed_corpus(tmp_path_factory.mktemp("golden"))


def manifest_facts(manifest: TokenizeManifest) -> dict:
    """The manifest's fields that depend only on the corpus, the checkpoint and the format."""
    return {
        "version": manifest.version,
        "samples": manifest.samples,
        "splits": manifest.splits,
        "levels": list(manifest.code_shapes),
        "code_shapes": manifest.code_shapes,
        "codebook_sizes": manifest.codebook_sizes,
        "class_names": manifest.class_names,
        "image_size": manifest.image_size,
        "channels": manifest.channels,
        "corpus_name": manifest.corpus_name,
        "shards": [(s.name, s.samples, s.bytes, s.class_counts) for s in manifest.shards],
    }


def test_tokenize_manifest_of_a_fixed_corpus(fixed_tokenize):
    expected = golden("tokenize.json")["manifest"]
    found = json.loads(json.dumps(manifest_facts(fixed_tokenize)))  # tuples and int keys as JSON
    assert found == expected


def test_shard_member_names_and_code_bytes(fixed_tokenize):
    spec = golden("tokenize.json")
    names, digests = shard_contents(fixed_tokenize)
    assert names == spec["members"]
    assert digests == spec["member_sha256"]
    # The same samples always make the same shard, byte for byte (member times and modes fixed).
    for shard in fixed_tokenize.shards:
        with open(shard.uri, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == spec["shard_sha256"][shard.name]
    # The tokenizer identity the manifest records is the file's own digest.
    with open(fixed_tokenize.tokenizer.checkpoint, "rb") as f:
        assert fixed_tokenize.tokenizer.sha256 == hashlib.sha256(f.read()).hexdigest()


def test_a_code_map_is_a_plain_uint8_npy(fixed_tokenize):
    """The bytes of one stored code map, byte for byte: numpy's format 1.0 header, uint8 row-major
    (codebooks of up to 256 codes), so any numpy reads it without this project."""
    spec = golden("tokenize.json")["code_npy"]
    import tarfile

    shard = fixed_tokenize.shards[0]
    with tarfile.open(shard.uri) as tar:
        data = tar.extractfile(spec["member"]).read()
    assert data.hex() == spec["bytes_hex"]
