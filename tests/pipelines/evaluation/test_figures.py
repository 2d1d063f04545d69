"""Report figures: training curves read back from a real MLflow store, and code usage."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from pipelines.evaluation.figures import (
    Curve,
    Panel,
    autoencoder_curves,
    code_usage_figure,
    metric_history,
    prior_curves,
    training_curves_figure,
)
from pipelines.tracking import TrackingContext

# Matches the figures' layout: 4.8 x 3.4 inches per panel at 100 dpi.
PANEL_WIDTH = 480
SMALL_MODEL = {"channels": 16, "res_blocks": 1, "res_channels": 8, "embed_dim": 8}


def _decode(png: bytes | None) -> Image.Image:
    """The PNG as an RGB image, after checking that it is a real, non-blank picture."""
    assert png is not None and png.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    image.load()  # decodes every pixel: a truncated file raises here
    assert image.width >= 400 and image.height >= 300
    pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert pixels.std() > 5  # axes, curves and text, not a blank canvas
    assert 10_000 < len(png) < 2_000_000
    return image


@pytest.fixture
def tracking(tmp_path) -> TrackingContext:
    """A run in a real SQLite MLflow store, logged to the way the training stages log."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("figures")
    run = client.create_run(experiment, run_name="train_vqvae")
    return TrackingContext(uri, run.info.run_id)


def _log_vqvae2_run(tracking: TrackingContext, steps: int = 40) -> None:
    rng = np.random.default_rng(0)
    for step in range(5, steps + 1, 5):
        decay = 1.0 / step
        metrics = {
            "train/loss": 0.5 * decay + 0.01 * rng.random(),
            "train/reconstruction": 0.3 * decay,
            "train/seconds_per_step": 0.1,
        }
        for level in ("top", "bottom"):
            metrics |= {
                f"train/commitment/{level}": 0.05 * decay,
                f"train/codebook/{level}": 0.08 * decay,
                f"train/perplexity/{level}": 4 + step / 4,
                f"train/usage/{level}": min(1.0, 0.2 + step / 50),
            }
        tracking.log_metrics(metrics, step=step)
        if step % 10 == 0:
            held = {"validation/mse": 0.35 * decay}
            for level in ("top", "bottom"):
                held |= {
                    f"validation/perplexity/{level}": 5 + step / 4,
                    f"validation/usage/{level}": min(1.0, 0.3 + step / 50),
                }
            tracking.log_metrics(held, step=step)


def test_metric_history_reads_every_step_and_the_latest_value_of_a_repeated_step(tracking):
    tracking.log_metrics({"train/loss": 3.0, "validation/mse": 0.5}, step=2)
    tracking.log_metrics({"train/loss": 2.0}, step=4)
    tracking.log_metrics({"train/loss": 1.0, "validation/mse": 0.25}, step=6)
    # A resumed run logs the steps after its last checkpoint again; the rerun's value counts.
    tracking.log_metrics({"train/loss": 1.5}, step=4)

    histories = metric_history(
        tracking.client(), tracking.run_id, ["train/loss", "validation/mse", "never/logged"]
    )
    assert histories == {
        "train/loss": [(2, 3.0), (4, 1.5), (6, 1.0)],
        "validation/mse": [(2, 0.5), (6, 0.25)],
        "never/logged": [],
    }


def test_every_stage_figure_renders_from_mlflow_and_drops_panels_without_data(tracking, tmp_path):
    _log_vqvae2_run(tracking)
    loss, codebooks = autoencoder_curves(["top", "bottom"])
    client = tracking.client()

    loss_png = training_curves_figure(
        metric_history(client, tracking.run_id, loss.keys), loss.title, loss.panels
    )
    # Three panels are specified; the dVAE's Gumbel-softmax schedule was never logged by a
    # VQ-VAE-2, so its panel is left out and the figure is two panels wide.
    assert len(loss.panels) == 3
    assert _decode(loss_png).width == 2 * PANEL_WIDTH
    (tmp_path / "loss.png").write_bytes(loss_png)

    codebook_png = training_curves_figure(
        metric_history(client, tracking.run_id, codebooks.keys), codebooks.title, codebooks.panels
    )
    assert _decode(codebook_png).width == 2 * PANEL_WIDTH

    # The prior figure: the top prior logged train and validation curves, the evaluate stage's
    # test score is one point; the bottom prior logged nothing, so only the top panel is drawn.
    for step in range(10, 101, 10):
        tracking.log_metrics({"top/train_bits_per_code": 5 - step / 50}, step=step)
        if step % 50 == 0:
            tracking.log_metrics({"top/validation_bits_per_code": 5.2 - step / 60}, step=step)
    (prior,) = prior_curves(["top", "bottom"])
    histories = metric_history(client, tracking.run_id, prior.keys)
    # Before the evaluate stage has run there is no test score: the curves alone are drawn.
    assert _decode(training_curves_figure(histories, prior.title, prior.panels)).width == (
        PANEL_WIDTH
    )
    histories["test/bits_per_code/top"] = [(0, 3.6)]
    prior_png = training_curves_figure(histories, prior.title, prior.panels)
    assert _decode(prior_png).width == PANEL_WIDTH


def test_figure_with_no_data_at_all_is_none_not_an_error(tracking):
    for figure in autoencoder_curves(["codes"]) + prior_curves(["codes"]):
        histories = metric_history(tracking.client(), tracking.run_id, figure.keys)
        assert all(h == [] for h in histories.values())
        assert training_curves_figure(histories, figure.title, figure.panels) is None
    assert training_curves_figure({}, "nothing") is None


@pytest.mark.filterwarnings("error")  # matplotlib warns when it cannot log-scale the data
def test_log_axis_falls_back_to_linear_for_values_that_are_not_positive():
    # An EMA codebook has no codebook loss: it can be logged as exactly 0, which a log axis
    # cannot show.
    panel = Panel(
        "Quantizer losses", "loss (log scale)", (Curve("codebook/top", "codebook"),), log_y=True
    )
    histories = {"codebook/top": [(1, 0.0), (2, 0.0), (3, 0.0)]}
    _decode(training_curves_figure(histories, "zeros", [panel]))


def test_default_panel_draws_every_metric_given():
    histories = {
        "x": [(i, float(i)) for i in range(100)],
        "y": [(i, 100.0 - i) for i in range(100)],
    }
    assert _decode(training_curves_figure(histories, "two metrics")).width == PANEL_WIDTH


@pytest.mark.parametrize("kind", ["vqvae2", "vqvae", "dvae"])
def test_specs_name_every_metric_the_autoencoder_stage_logs(kind):
    """The curves must follow the names training really logs, or the figures come out empty."""
    from pipelines.config import TrainVQVAESection
    from pipelines.stages.train_vqvae import (
        autoencoder_loss,
        build_autoencoder,
        evaluate_autoencoder,
    )

    extra = {"downsample": 4} if kind == "dvae" else {}
    section = TrainVQVAESection(kind=kind, model={**SMALL_MODEL, **extra})
    torch.manual_seed(0)
    model = build_autoencoder(section, in_channels=3)
    images = np.random.default_rng(0).integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)
    _, logs = autoencoder_loss(section, model.config)(model, {"image": torch.from_numpy(images)}, 1)
    with torch.no_grad():
        held = evaluate_autoencoder(model.eval(), torch.device("cpu"), images, batch_size=4)
    specified = {k for figure in autoencoder_curves(model.levels) for k in figure.keys}
    assert set(logs) | set(held) <= specified


def test_specs_name_every_metric_the_prior_stage_logs():
    from pipelines.config import TrainPriorSection
    from pipelines.stages.train_prior import evaluate_prior, plan_priors, prior_loss
    from tests.pipelines.conftest import tiny_raw_config
    from tests.pipelines.stages.test_train_prior import tokenize_manifest
    from vq_core.checkpoint import model_from_config

    tokenized = tokenize_manifest(
        levels=["top", "bottom"],
        codebook_sizes={"top": 8, "bottom": 8},
        code_shapes={"top": [2, 2], "bottom": [4, 4]},
        class_names=["circle", "square"],
    )
    section = TrainPriorSection(**tiny_raw_config("out", "corpus")["train_prior"])
    rng = np.random.default_rng(0)
    batch = {
        "top": rng.integers(0, 8, size=(4, 2, 2)),
        "bottom": rng.integers(0, 8, size=(4, 4, 4)),
        "label": rng.integers(0, 2, size=4),
    }
    logged = set()
    for plan in plan_priors(tokenized, section):
        torch.manual_seed(0)
        model = model_from_config(plan.model_name, plan.model_config)
        _, logs = prior_loss(plan, 2)(model, {k: torch.as_tensor(v) for k, v in batch.items()}, 0)
        with torch.no_grad():
            held = evaluate_prior(model.eval(), torch.device("cpu"), batch, plan, batch_size=4)
        # fit() logs them under metric_prefix "<level>/".
        logged |= {f"{plan.level}/{k}" for k in {*logs, *held}}
    (figure,) = prior_curves(tokenized.levels)
    assert logged == {
        "top/train_bits_per_code",
        "top/validation_bits_per_code",
        "bottom/train_bits_per_code",
        "bottom/validation_bits_per_code",
    }
    assert logged <= set(figure.keys)


def test_code_usage_figure_shows_each_level(tmp_path):
    rng = np.random.default_rng(0)
    top = np.zeros(32, dtype=np.int64)
    top[:20] = rng.integers(1, 500, size=20)  # 12 codes never used
    bottom = rng.zipf(1.5, size=64).astype(np.int64)  # long tail: drawn on a log axis
    png = code_usage_figure({"top": top, "bottom": bottom})
    assert _decode(png).width == 2 * PANEL_WIDTH
    (tmp_path / "usage.png").write_bytes(png)


@pytest.mark.filterwarnings("error")  # a division by a zero total warns
def test_code_usage_figure_draws_a_level_without_codes():
    # A held-out split too small to hold a code map leaves a level's histogram empty.
    _decode(code_usage_figure({"codes": np.zeros(16, dtype=np.int64)}))


def test_code_usage_figure_rejects_what_is_not_a_histogram():
    with pytest.raises(ValueError, match="at least one level"):
        code_usage_figure({})
    with pytest.raises(ValueError, match=r"counts\['top'\].*shape \(2, 2\)"):
        code_usage_figure({"top": np.ones((2, 2))})
