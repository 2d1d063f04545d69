"""What the evaluation reads: the upstream stages' manifests, checked against each other."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.errors import InputError
from pipelines.manifest import read_manifest, require_manifest
from pipelines.stage_manifests import (
    SampleManifest,
    TokenizeManifest,
    TrainPriorManifest,
    TrainVQVAEManifest,
)


@dataclass(frozen=True)
class Upstream:
    """The manifests the evaluation reads; ``sample`` is None when that stage has not run, ``vq``
    when the tokenizer was pinned rather than trained here."""

    vq: TrainVQVAEManifest | None
    tok: TokenizeManifest
    priors: TrainPriorManifest
    sample: SampleManifest | None

    @classmethod
    def read(cls, output_dir: str) -> Upstream:
        tok = require_manifest(output_dir, TokenizeManifest)
        priors = require_manifest(output_dir, TrainPriorManifest)
        if priors.tokenizer.sha256 != tok.tokenizer.sha256:
            raise InputError(
                f"the priors model codes of the tokenizer {priors.tokenizer.describe()}, but this "
                f"run's corpus was tokenized with {tok.tokenizer.describe()}; their bits per code "
                "on it would mean nothing"
            )
        if priors.labelled != tok.labelled:
            kinds = {True: "labelled", False: "unlabelled"}
            raise InputError(
                f"the priors were trained on {kinds[priors.labelled]} codes, but this run's "
                f"corpus is {kinds[tok.labelled]}; evaluate them on a corpus like theirs"
            )
        vq = read_manifest(output_dir, TrainVQVAEManifest)
        if vq is not None and vq.checkpoint != tok.tokenizer.checkpoint:
            vq = None  # a pinned tokenizer: this output_dir's train_vqvae is not the one used
        return cls(
            vq=vq,
            tok=tok,
            priors=priors,
            sample=read_manifest(output_dir, SampleManifest),
        )

    def prior_labels(self) -> np.ndarray | None:
        """The priors' label of each of the corpus' labels (None when they are the same)."""
        names = self.priors.class_names
        missing = [n for n in self.tok.class_names if n not in names]
        if missing:
            raise InputError(
                f"the priors know no class {missing} of this corpus (their classes: {names})"
            )
        labels = [names.index(n) for n in self.tok.class_names]
        return None if labels == list(range(len(labels))) else np.asarray(labels, np.int64)
