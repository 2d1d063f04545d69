"""Several code datasets read as one: what train_prior trains on (``train_prior.shards``).

Each member is the output of one tokenize run (its manifest names the shards). Members must come
from one tokenizer (the same checkpoint sha256), so that a code means the same thing in all of
them, and share code shapes and split fractions. In the union:

- a sample's key is ``<corpus_name>/<key>``, so keys stay unique when two corpora use the same
  names; its split is still that of the stored key (computed before the prefix), so uniting
  corpora never moves a sample between train, validation and test;
- classes are merged by name, in order of first appearance (corpus A's "cat" and corpus B's "cat"
  are one class); each corpus' stored labels are mapped to the merged ones when read.

A single member (the default: this run's tokenize) is read as it is: no prefix, its own labels.
Unlabelled corpora (no classes) unite with each other, never with labelled ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.data import storage
from pipelines.data.shards import check_shard_files, relabel_codes
from pipelines.errors import ConfigError, InputError, MissingInputError
from pipelines.manifest import MANIFEST_NAME, read_manifest_at
from pipelines.stage_manifests import CorpusCodes, TokenizeManifest
from pipelines.tokenizer import TokenizerIdentity


def manifest_uri(entry: str) -> str:
    """The tokenize manifest an entry of train_prior.shards names: a manifest.json, a tokenize
    stage folder, or an output_dir holding one."""
    entry = entry.rstrip("/")
    if entry.endswith(".json"):
        return entry
    direct = storage.join(entry, MANIFEST_NAME)
    if storage.exists(direct):
        return direct
    return storage.join(entry, TokenizeManifest.stage, MANIFEST_NAME)


def read_member(entry: str) -> TokenizeManifest:
    uri = manifest_uri(entry)
    manifest = read_manifest_at(uri, TokenizeManifest)
    if manifest is None:
        raise MissingInputError(
            f"train_prior.shards entry {entry!r} holds no tokenize manifest (looked for {uri}); "
            "name a tokenize stage folder, an output_dir or a tokenize manifest.json"
        )
    return manifest


@dataclass(frozen=True)
class CodeUnion:
    """Tokenize outputs made with one tokenizer, with their classes merged by name."""

    members: tuple[TokenizeManifest, ...]
    sources: tuple[str, ...]  # manifest URI of each member
    class_names: tuple[str, ...]
    label_maps: tuple[tuple[int, ...], ...]  # per member: stored label -> merged label

    @property
    def first(self) -> TokenizeManifest:
        return self.members[0]

    @property
    def tokenizer(self) -> TokenizerIdentity:
        return self.first.tokenizer

    @property
    def labelled(self) -> bool:
        """Whether the samples have classes (a union never mixes labelled and unlabelled)."""
        return self.first.labelled

    @property
    def prefixed(self) -> bool:
        return len(self.members) > 1

    def corpora(self) -> list[CorpusCodes]:
        return [
            CorpusCodes(name=m.corpus_name, manifest=uri, samples=m.samples, labels=list(labels))
            for m, uri, labels in zip(self.members, self.sources, self.label_maps)
        ]

    def shard_uris(self) -> list[str]:
        return [shard.uri for m in self.members for shard in m.shards]

    def removed(self) -> dict[str, frozenset[str]]:
        """Shard URI -> stored keys to skip, over every member."""
        out: dict[str, frozenset[str]] = {}
        for m in self.members:
            by_name = m.removed_keys()
            for shard in m.shards:
                if shard.name in by_name:
                    out[shard.uri] = by_name[shard.name]
        return out

    def shard_label_maps(self) -> dict[str, tuple[int, ...]]:
        """Shard URI -> label map, for the members whose labels change in the union."""
        out: dict[str, tuple[int, ...]] = {}
        for m, labels in zip(self.members, self.label_maps):
            if list(labels) != list(range(len(labels))):
                out.update({shard.uri: labels for shard in m.shards})
        return out

    def dataset(self, split: str):
        """The union's samples of ``split`` as one ray.data.Dataset (``shards.code_dataset``'s
        columns), keys prefixed and labels merged when there are several members."""
        from pipelines.data.shards import code_dataset

        if not self.prefixed:
            return code_dataset(self.first, split=split)
        parts = [
            code_dataset(m, split=split).map_batches(
                relabel_codes,
                batch_format="numpy",
                fn_kwargs={"prefix": m.corpus_name, "labels": np.asarray(labels, dtype=np.int64)},
            )
            for m, labels in zip(self.members, self.label_maps)
        ]
        return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _same(members: list[TokenizeManifest], sources: list[str], what: str, get) -> None:
    first = get(members[0])
    for m, uri in zip(members[1:], sources[1:]):
        if get(m) != first:
            raise ConfigError(
                f"train_prior.shards: {uri} has {what} {get(m)!r}, but {sources[0]} has "
                f"{first!r}; code datasets trained on together must agree"
            )


def unite(members: list[TokenizeManifest], sources: list[str]) -> CodeUnion:
    """Check that the members can be trained on together and merge their classes."""
    if not members:
        raise ConfigError("train_prior.shards names no code datasets")
    for member in members:
        check_shard_files(member)  # before any worker reads them
    first = members[0].tokenizer
    for m, uri in zip(members[1:], sources[1:]):
        if m.tokenizer.sha256 != first.sha256:
            raise InputError(
                f"train_prior.shards mixes tokenizers: {uri} was made with "
                f"{m.tokenizer.describe()}, but {sources[0]} with {first.describe()}; code "
                "datasets trained on together must come from one tokenizer"
            )
    _same(members, sources, "code levels", lambda m: list(m.levels))
    _same(members, sources, "code shapes", lambda m: dict(m.code_shapes))
    _same(members, sources, "codebook sizes", lambda m: dict(m.codebook_sizes))
    _same(
        members,
        sources,
        "split fractions (validation, test)",
        lambda m: (m.validation_fraction, m.test_fraction),
    )
    names = [m.corpus_name for m in members]
    for i, name in enumerate(names):
        if name in names[:i]:
            other = sources[names.index(name)]
            raise ConfigError(
                f"train_prior.shards: {sources[i]} and {other} both have corpus name {name!r}, "
                "which would make their keys collide; give one another tokenize.corpus_name"
            )
    labelled = [m.labelled for m in members]
    if any(labelled) and not all(labelled):
        unlabelled = [uri for uri, has in zip(sources, labelled) if not has]
        raise ConfigError(
            f"train_prior.shards mixes labelled corpora with unlabelled ones ({unlabelled}); a "
            "class-conditional prior needs a class for every sample, so train on the labelled "
            "corpora or on the unlabelled ones"
        )
    merged: list[str] = []
    maps = []
    for m in members:
        for name in m.class_names:
            if name not in merged:
                merged.append(name)
        maps.append(tuple(merged.index(name) for name in m.class_names))
    return CodeUnion(tuple(members), tuple(sources), tuple(merged), tuple(maps))
