"""A checkpoint's metadata: typed, read and written in one place, and the stored dict unchanged
for checkpoints written before it had a type."""

from __future__ import annotations

import io

import pytest
import torch

from pipelines.checkpoint_meta import (
    CheckpointMeta,
    checkpoint_bytes,
    load_with_meta,
    save_with_meta,
)
from vq_core.checkpoint import load_checkpoint, save_checkpoint
from vq_core.vqvae import VQVAE, VQVAEConfig

# What a published train_vqvae model held, as the writers built the dict by hand before: the
# stage's extra, then the training loop's keys, then the step's, then the stage's data keys.
OLD_STYLE = {
    "kind": "vqvae",
    "epoch": 3,
    "epoch_batch": 5,
    "trained_steps": 40,
    "stale_evaluations": 1,
    "step": 40,
    "metrics": {"step": 40, "loss": 0.25, "validation/mse": 0.0125},
    "image_size": [16, 24],
    "channels": 3,
    "class_names": ["circle", "square"],
}


def _model() -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(VQVAEConfig(codebook_size=16, channels=16, res_blocks=1, res_channels=8))


def _saved(extra) -> bytes:
    buffer = io.BytesIO()
    save_checkpoint(_model(), buffer, extra=extra)
    return buffer.getvalue()


def test_a_checkpoint_written_with_a_plain_dict_reads_as_typed_metadata():
    _, meta = load_with_meta(_saved(OLD_STYLE))
    assert meta.kind == "vqvae" and meta.step == 40 and meta.trained_step() == 40
    assert (meta.epoch, meta.epoch_batch, meta.stale_evaluations) == (3, 5, 1)
    assert meta.metrics["validation/mse"] == 0.0125
    assert meta.image_size == [16, 24] and meta.channels == 3
    assert meta.class_names == ["circle", "square"]
    # Fields no writer set read as their defaults.
    assert meta.level is None and meta.condition is None and meta.selected is False


def test_rewriting_an_old_checkpoint_keeps_its_dict_and_its_bytes():
    """The stored dict keeps its keys, their order and their types (the int step among the
    float metrics stays an int), so the same model and metadata give the same bytes."""
    old = _saved(OLD_STYLE)
    _, meta = load_with_meta(old)
    assert list(meta.to_extra().items()) == list(OLD_STYLE.items())
    assert isinstance(meta.to_extra()["metrics"]["step"], int)
    assert checkpoint_bytes(_model(), meta) == old


def test_unknown_keys_survive_a_load_and_a_save(tmp_path):
    written = {**OLD_STYLE, "note": "from another tool", "extra_levels": [1, 2]}
    _, meta = load_with_meta(_saved(written))
    assert meta.model_extra == {"note": "from another tool", "extra_levels": [1, 2]}
    path = tmp_path / "again.pt"
    save_with_meta(_model(), path, meta)
    _, stored = load_checkpoint(path)
    assert stored == written


def test_typed_metadata_round_trips_through_a_checkpoint(tmp_path):
    meta = CheckpointMeta(level="bottom", condition=None).model_copy(
        update={"epoch": 1, "epoch_batch": 2, "trained_steps": 9, "stale_evaluations": 0}
    )
    meta = meta.model_copy(update={"step": 6, "metrics": {"step": 6, "bits": 3.5}})
    meta = meta.model_copy(update={"selected": True})
    path = tmp_path / "prior.pt"
    save_with_meta(_model(), path, meta)
    _, loaded = load_with_meta(path)
    assert loaded == meta
    # Only what was set is stored, condition=None included (it was set), in declared order.
    _, stored = load_checkpoint(path)
    assert list(stored) == [
        "level",
        "condition",
        "epoch",
        "epoch_batch",
        "trained_steps",
        "stale_evaluations",
        "step",
        "metrics",
        "selected",
    ]


def test_a_checkpoint_without_metadata_has_defaults_but_no_training_step():
    _, meta = load_with_meta(_saved(None))
    assert meta.to_extra() == {} and meta.image_size is None and meta.metrics == {}
    with pytest.raises(ValueError, match="records no training step"):
        meta.trained_step()


def test_metadata_of_the_wrong_type_is_refused():
    with pytest.raises(ValueError, match="image_size"):
        CheckpointMeta.from_extra({"image_size": "big"})
