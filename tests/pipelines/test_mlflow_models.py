"""The models as MLflow models: logged from code, registered, loaded back by models:/ URI."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch

from pipelines.data.images import to_model_input
from pipelines.errors import InputError
from pipelines.mlflow_models import log_checkpoint_model, resolve_checkpoint
from pipelines.tools.reconstruct import reconstruct_folder
from pipelines.tracking import Tracker
from vq_core.checkpoint import load_checkpoint, save_checkpoint
from vq_core.pixelsnail import PixelSNAIL, PixelSNAILConfig
from vq_core.transformer import TransformerPrior, TransformerPriorConfig
from vq_core.vqvae import VQVAE2, VQVAE2Config


def _bytes(model) -> bytes:
    import io

    buffer = io.BytesIO()
    save_checkpoint(model, buffer, extra={"image_size": [16, 16]})
    return buffer.getvalue()


@pytest.fixture
def tracker(tmp_path):
    return Tracker(f"sqlite:///{tmp_path}/mlflow.db", "models")


def test_tokenizer_round_trips_through_the_registry(tracker, tmp_path):
    torch.manual_seed(0)
    model = VQVAE2(
        VQVAE2Config(channels=16, res_channels=8, res_blocks=1, embed_dim=8, codebook_size_top=16)
    ).eval()
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    expected = [c.numpy() for c in model.encode(to_model_input(images))]
    with tracker.stage_run("train_vqvae") as tracking:
        uri = log_checkpoint_model(
            tracking,
            "tokenizer",
            _bytes(model),
            images[:1],
            {"top": expected[0][:1], "bottom": expected[1][:1]},
            "test-tokenizer",
            name="tokenizer",
        )
    assert uri == "models:/test-tokenizer/1"

    loaded = mlflow.pyfunc.load_model(uri)
    codes = loaded.predict(images)
    np.testing.assert_array_equal(codes["top"], expected[0])
    np.testing.assert_array_equal(codes["bottom"], expected[1])
    assert loaded.metadata.signature is not None
    assert not list(tmp_path.rglob("*.pkl")), "the model must not be pickled"

    # Every command that takes a checkpoint takes the registered model too.
    path = resolve_checkpoint(uri)
    restored, _ = load_checkpoint(path)
    for a, b in zip(restored.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    from PIL import Image

    Image.fromarray(images[0]).save(folder / "x.png")
    summary = reconstruct_folder(uri, str(tmp_path / "images"), str(tmp_path / "out"))
    assert summary["written"] == 1


PRIORS = {
    "pixelsnail": lambda: PixelSNAIL(
        PixelSNAILConfig(
            num_codes=8,
            height=2,
            width=3,
            channels=8,
            num_blocks=1,
            res_blocks=1,
            num_heads=2,
            attention_channels=8,
            num_classes=3,
        )
    ),
    "transformer": lambda: TransformerPrior(
        TransformerPriorConfig(
            num_codes=8, height=2, width=3, channels=8, num_layers=1, num_heads=2, num_classes=3
        )
    ),
}


@pytest.mark.parametrize("kind", sorted(PRIORS))
def test_prior_samples_codes_for_labels(tracker, kind):
    torch.manual_seed(0)
    prior = PRIORS[kind]()
    example = {"labels": np.zeros(1, dtype=np.int64)}
    with tracker.stage_run("train_prior") as tracking:
        uri = log_checkpoint_model(
            tracking,
            "prior",
            _bytes(prior),
            example,
            np.zeros((1, 2, 3), dtype=np.int64),
            f"test-prior-{kind}",
            name="prior-top",
        )
    loaded = mlflow.pyfunc.load_model(uri)
    labels = {"labels": np.array([0, 1, 2, 2], dtype=np.int64)}
    first = loaded.predict(labels, params={"seed": 5})
    assert first.shape == (4, 2, 3) and first.dtype == np.int64 and first.max() < 8
    np.testing.assert_array_equal(loaded.predict(labels, params={"seed": 5}), first)
    # The params reach the model (MLflow drops params its signature does not declare).
    assert loaded.metadata.signature.params is not None
    others = [loaded.predict(labels, params={"seed": seed}) for seed in range(6, 10)]
    assert any(not np.array_equal(other, first) for other in others)


def test_unknown_registered_model_is_named(tracker):
    with pytest.raises(InputError, match="models:/nothing-here/3"):
        resolve_checkpoint("models:/nothing-here/3")


def test_a_registered_prior_takes_the_guidance_param(tracker):
    torch.manual_seed(0)
    config = TransformerPriorConfig(
        num_codes=8, height=2, width=3, channels=8, num_layers=1, num_heads=2, num_classes=3,
        label_dropout=0.1,
    )  # fmt: skip
    prior = TransformerPrior(config)
    torch.nn.init.normal_(prior.class_embedding.weight, std=3.0)  # make the class matter
    with tracker.stage_run("train_prior") as tracking:
        uri = log_checkpoint_model(
            tracking,
            "prior",
            _bytes(prior),
            {"labels": np.zeros(1, dtype=np.int64)},
            np.zeros((1, 2, 3), dtype=np.int64),
            "test-prior-guided",
            name="prior-top",
        )
    loaded = mlflow.pyfunc.load_model(uri)
    labels = np.array([0, 1, 2, 2], dtype=np.int64)
    guided = loaded.predict({"labels": labels}, params={"seed": 5, "guidance": 0.0})
    # Guidance 0 ignores the class: the draws of the "no class" label (3), by the model itself.
    expected = prior.sample(
        4, labels=torch.full((4,), 3), generator=torch.Generator().manual_seed(5)
    )
    np.testing.assert_array_equal(guided, expected.numpy())
    assert not np.array_equal(loaded.predict({"labels": labels}, params={"seed": 5}), guided)
