"""What a pipeline checkpoint records beside its weights: the ``extra`` of a vq_core checkpoint.

vq_core stores ``extra`` as a plain dict and knows nothing of training runs or corpora; this module
is the one place that gives the dict a schema. Writers build a ``CheckpointMeta`` and save with
``save_with_meta``; readers load with ``load_with_meta`` and read attributes.

Who writes which fields:

    every training checkpoint (pipelines.training)   step, metrics, epoch, epoch_batch,
                                                      trained_steps, stale_evaluations
    the best-scoring weights (fit(select_metric=))    the same, step and metrics of the step
                                                      selected, and selected=True
    train_vqvae                                       kind; its published model also image_size,
                                                      channels, class_names
    train_prior                                       level, condition

The stored dict keeps the keys it always had: a field is stored only when a writer set it, in the
order declared below, so checkpoints written before this module load unchanged and a round trip
gives back the same dict (and the same bytes). Keys this model does not declare are kept
(``model_extra``) and written back, never dropped.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from torch import nn

    from vq_core.checkpoint import PathOrBuffer


class CheckpointMeta(BaseModel):
    """The metadata of a checkpoint; a field a writer did not set reads as its default."""

    # "allow": keys written by other code (or a later version) survive a load and a save.
    model_config = ConfigDict(extra="allow")

    # What the stage that trains the model adds to every checkpoint of its run.
    kind: str | None = None  # train_vqvae: the autoencoder kind (vqvae2, vqvae, dvae)
    level: str | None = None  # train_prior: the code level the prior models
    condition: str | None = None  # train_prior: the level it is conditioned on, if any
    # Where in the data training stood: the epoch and the batches of it already trained on.
    epoch: int = 0
    epoch_batch: int = 0
    trained_steps: int | None = None  # optimizer steps run (early stopping may end them early)
    stale_evaluations: int = 0  # evaluations in a row that missed the best score
    step: int | None = None  # the step of these weights (of the best ones when selected)
    metrics: dict[str, int | float] = {}  # the scalars reported at that step ("step" included)
    selected: bool = False  # the weights that scored best on the run's select_metric
    # What the published autoencoder was trained on.
    image_size: list[int] | None = None  # [height, width]
    channels: int | None = None
    class_names: list[str] | None = None

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any] | None) -> CheckpointMeta:
        """The metadata of a checkpoint's ``extra`` dict (None: a checkpoint without any)."""
        return cls.model_validate(dict(extra or {}))

    def to_extra(self) -> dict[str, Any]:
        """The plain dict vq_core stores: the fields a writer set, and the undeclared keys."""
        return _interned_keys(self.model_dump(exclude_unset=True))

    def trained_step(self) -> int:
        """``step``, which every checkpoint pipelines.training writes records."""
        if self.step is None:
            raise ValueError(
                "the checkpoint records no training step; it was not written by a training run "
                f"(its metadata: {self.to_extra()})"
            )
        return self.step


def _interned_keys(value: Any) -> Any:
    # Pickle writes an object seen before as a back-reference, by identity. Dicts built from
    # literals (as the writers did) or unpickled share one object per key name ("step" at the
    # top and in metrics); validation copies strings, so intern them to keep the stored bytes.
    if isinstance(value, dict):
        return {sys.intern(k) if type(k) is str else k: _interned_keys(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_interned_keys(v) for v in value)
    return value


def load_with_meta(
    path_or_buffer: PathOrBuffer | bytes, **kwargs: Any
) -> tuple[nn.Module, CheckpointMeta]:
    """``vq_core.checkpoint.load_checkpoint`` (same arguments) with its extra as metadata."""
    from vq_core.checkpoint import load_checkpoint

    model, extra = load_checkpoint(path_or_buffer, **kwargs)
    return model, CheckpointMeta.from_extra(extra)


def save_with_meta(model: nn.Module, path_or_buffer: PathOrBuffer, meta: CheckpointMeta) -> None:
    """``vq_core.checkpoint.save_checkpoint`` with ``meta`` as its extra."""
    from vq_core.checkpoint import save_checkpoint

    save_checkpoint(model, path_or_buffer, extra=meta.to_extra())


def checkpoint_bytes(model: nn.Module, meta: CheckpointMeta) -> bytes:
    """The bytes ``save_with_meta`` writes."""
    buffer = io.BytesIO()
    save_with_meta(model, buffer, meta)
    return buffer.getvalue()
