"""Figures for the report: training curves read back from MLflow, and code usage per level.

Every function returns PNG bytes (or None when there is nothing to draw), ready for
``pipelines.evaluation.report.Figure``. Figures are drawn on matplotlib's Agg canvas without pyplot, so they
need no display and share no global state between threads or Ray workers.

A training-curve figure is a list of ``Panel``s, each a list of ``Curve``s naming MLflow metrics.
``autoencoder_curves`` and ``prior_curves`` say which figures the training stages' metrics make; the evaluate stage
reads each stage run's history with ``metric_history`` and draws them with
``training_curves_figure``. A curve whose metric was not logged (a dVAE has no commitment loss, a
run without a held-out split has no held-out curves) is left out, and so is a panel left empty.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where a figure is drawn: workers that import this module draw none
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure as MplFigure
    from mlflow.tracking import MlflowClient

History = list[tuple[int, float]]  # (step, value), sorted by step
Histories = Mapping[str, History]

# Held-out metrics are computed every eval_every steps, a few points per run: markers show where.
_MARKERS_BELOW = 60
_DPI = 100
_PANEL_SIZE = (4.8, 3.4)  # inches per panel
_MAX_COLUMNS = 3


@dataclass(frozen=True)
class Curve:
    """One metric drawn in a panel.

    ``horizontal`` draws the metric's last value as a dashed line across the panel: for a number
    measured once (e.g. the evaluate stage's test bits per code) beside curves over steps. Curves
    sharing a ``group`` (e.g. a level) share a colour; the held-out curve of a level is told from
    its training curve by ``dashed``.
    """

    key: str
    label: str
    group: str = ""
    dashed: bool = False
    horizontal: bool = False


@dataclass(frozen=True)
class Panel:
    """One set of axes. ``log_y`` falls back to a linear axis when a value is not positive."""

    title: str
    ylabel: str
    curves: tuple[Curve, ...]
    log_y: bool = False
    ylim: tuple[float, float] | None = None

    @property
    def keys(self) -> list[str]:
        return [c.key for c in self.curves]


@dataclass(frozen=True)
class CurveFigure:
    """One PNG of one or more panels: ``filename`` is where the report puts it."""

    title: str
    filename: str
    caption: str
    panels: tuple[Panel, ...]

    @property
    def keys(self) -> list[str]:
        return list(dict.fromkeys(k for panel in self.panels for k in panel.keys))


# -------------------------------------------------------------------------------------------------
# Reading MLflow


def metric_history(client: MlflowClient, run_id: str, keys: Sequence[str]) -> dict[str, History]:
    """Every logged (step, value) of each metric in ``keys``, sorted by step.

    A metric the run never logged maps to an empty list. When a step was logged more than once
    (a resumed training run repeats the steps after its last checkpoint), the latest value wins.
    Non-finite values are dropped: they cannot be drawn and would break a log axis.
    """
    histories: dict[str, History] = {}
    for key in dict.fromkeys(keys):
        by_step: dict[int, tuple[int, float]] = {}
        for m in client.get_metric_history(run_id, key):
            if math.isfinite(m.value) and (
                m.step not in by_step or m.timestamp >= by_step[m.step][0]
            ):
                by_step[int(m.step)] = (m.timestamp, float(m.value))
        histories[key] = [(step, value) for step, (_, value) in sorted(by_step.items())]
    return histories


# -------------------------------------------------------------------------------------------------
# What each training stage logs


def autoencoder_curves(levels: Sequence[str]) -> list[CurveFigure]:
    """The training-curve figures of the autoencoder stage.

    ``levels`` are the autoencoder's code levels (top and bottom for the default VQ-VAE-2, any
    named levels for a deeper one, "codes" for a one-level VQ-VAE or dVAE). Metric names are
    those the stage logs to its MLflow run: ``train/loss``, ``train/reconstruction``,
    ``train/commitment/<level>``, ``train/codebook/<level>``, ``train/perplexity/<level>`` and
    ``train/usage/<level>`` (per training batch); ``train/kl``, ``train/temperature``,
    ``train/kl_weight`` (dVAE only); ``validation/mse``, ``validation/perplexity/<level>`` and
    ``validation/usage/<level>`` (every eval_every steps).
    """
    levels = list(levels)
    return [
        CurveFigure(
            "Autoencoder training",
            "figures/curves-autoencoder-loss.png",
            "Autoencoder losses over training steps (training batches: means over log_every "
            "steps; validation: every eval_every steps)",
            (_autoencoder_loss_panel(), _quantizer_loss_panel(levels), _gumbel_schedule_panel()),
        ),
        CurveFigure(
            "Codebooks during training",
            "figures/curves-autoencoder-codebooks.png",
            "Code usage and perplexity per level: per training batch (solid) and over the "
            "validation images (dashed)",
            (
                Panel(
                    "Codebook usage",
                    "fraction of codes used",
                    _train_and_holdout("usage", levels),
                    ylim=(0.0, 1.05),
                ),
                Panel(
                    "Codebook perplexity",
                    "perplexity (codes)",
                    _train_and_holdout("perplexity", levels),
                ),
            ),
        ),
    ]


def _autoencoder_loss_panel() -> Panel:
    return Panel(
        "Autoencoder loss",
        "loss (log scale)",
        (
            Curve("train/loss", "total loss (train)"),
            Curve("train/reconstruction", "reconstruction MSE (train)", group="mse"),
            Curve("validation/mse", "reconstruction MSE (validation)", group="mse", dashed=True),
            Curve("train/kl", "KL to uniform (train)", group="kl"),
        ),
        log_y=True,
    )


def _quantizer_loss_panel(levels: list[str]) -> Panel:
    return Panel(
        "Quantizer losses",
        "loss (log scale)",
        tuple(
            curve
            for level in levels
            for curve in (
                Curve(f"train/commitment/{level}", f"commitment, {level}", group=level),
                Curve(f"train/codebook/{level}", f"codebook, {level}", group=level, dashed=True),
            )
        ),
        log_y=True,
    )


def _gumbel_schedule_panel() -> Panel:
    return Panel(
        "Gumbel-softmax schedule",
        "value",
        (
            Curve("train/temperature", "temperature"),
            Curve("train/kl_weight", "KL weight"),
        ),
    )


def prior_curves(levels: Sequence[str]) -> list[CurveFigure]:
    """The training-curve figure of the priors, one panel per level with a prior.

    Metric names: ``<level>/train_bits_per_code`` and ``<level>/validation_bits_per_code`` from the
    prior stage's run, and ``test/bits_per_code/<level>``, which the evaluate stage measures
    once: add it to the histories as a single point to see the test score beside the curves.
    """
    panels = tuple(
        Panel(
            f"{level} prior",
            "bits per code",
            (
                Curve(f"{level}/train_bits_per_code", "train", group=level),
                Curve(f"{level}/validation_bits_per_code", "validation", group=level, dashed=True),
                Curve(f"test/bits_per_code/{level}", "test (evaluate)", horizontal=True),
            ),
        )
        for level in levels
    )
    return [
        CurveFigure(
            "Prior training",
            "figures/curves-priors.png",
            "Each prior's negative log-likelihood in bits per code: training batches, "
            "validation during training (selects the kept weights), test in the evaluate stage",
            panels,
        )
    ]


def _train_and_holdout(stat: str, levels: list[str]) -> tuple[Curve, ...]:
    return tuple(
        curve
        for level in levels
        for curve in (
            Curve(f"train/{stat}/{level}", f"{level} (train batch)", group=level),
            Curve(f"validation/{stat}/{level}", f"{level} (validation)", group=level, dashed=True),
        )
    )


# -------------------------------------------------------------------------------------------------
# Drawing


def training_curves_figure(
    histories: Histories,
    title: str,
    panels: Sequence[Panel] | None = None,
    xlabel: str = "step",
) -> bytes | None:
    """A PNG of ``panels`` drawn from ``histories`` ({metric: [(step, value), ...]}).

    Without ``panels``, one panel with every metric in ``histories``. Curves without data are left
    out, and so are panels left without curves; None when no panel has anything to draw, so the
    report can leave the figure out.
    """
    if panels is None:
        panels = [Panel(title, "value", tuple(Curve(k, k) for k in histories))]
    drawable = [p for p in panels if any(histories.get(c.key) for c in p.curves)]
    if not drawable:
        return None
    columns = min(len(drawable), _MAX_COLUMNS)
    rows = math.ceil(len(drawable) / columns)
    figure = _new_figure(columns, rows)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, panel in zip(axes, drawable):
        _draw_panel(ax, panel, histories, xlabel)
    for ax in axes[len(drawable) :]:
        ax.set_visible(False)
    figure.suptitle(title)
    return _png(figure)


def _draw_panel(ax: Axes, panel: Panel, histories: Histories, xlabel: str) -> None:
    colours: dict[str, str] = {}
    drawn = [(c, histories[c.key]) for c in panel.curves if histories.get(c.key)]
    for curve, history in drawn:
        colour_key = curve.group or curve.key
        colour = colours.setdefault(colour_key, f"C{len(colours)}")
        steps = [s for s, _ in history]
        values = [v for _, v in history]
        if curve.horizontal:
            ax.axhline(values[-1], color=colour, linestyle=":", linewidth=1.5, label=curve.label)
            continue
        ax.plot(
            steps,
            values,
            color=colour,
            linestyle="--" if curve.dashed else "-",
            marker="o" if len(history) <= _MARKERS_BELOW else None,
            markersize=3,
            linewidth=1.4,
            label=curve.label,
        )
    every_value = [v for _, history in drawn for _, v in history]
    if panel.log_y and min(every_value) > 0:
        ax.set_yscale("log")
        ylabel = panel.ylabel
    else:
        ylabel = panel.ylabel.replace(" (log scale)", "")
    if panel.ylim is not None:
        ax.set_ylim(*panel.ylim)
    ax.set_title(panel.title, fontsize="medium")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small")


def code_usage_figure(counts: Mapping[str, np.ndarray]) -> bytes:
    """A PNG with one histogram per level of how often each code occurs, most frequent first.

    ``counts`` maps a level to its code histogram (length K, e.g. np.bincount of the held-out code
    maps with minlength=K). Each panel's title gives the codes used and the perplexity
    (exp of the histogram's entropy: the number of equally likely codes with the same spread).
    """
    if not counts:
        raise ValueError("code_usage_figure needs the code counts of at least one level, got none")
    columns = min(len(counts), _MAX_COLUMNS)
    rows = math.ceil(len(counts) / columns)
    figure = _new_figure(columns, rows)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, (level, level_counts) in zip(axes, counts.items()):
        level_counts = np.asarray(level_counts)
        if level_counts.ndim != 1 or len(level_counts) == 0 or (level_counts < 0).any():
            raise ValueError(
                f"counts[{level!r}] must be a non-empty 1-D histogram of non-negative counts, got "
                f"shape {level_counts.shape}"
            )
        _draw_usage(ax, level, level_counts.astype(np.float64))
    for ax in axes[len(counts) :]:
        ax.set_visible(False)
    figure.suptitle("Code usage per level (codes sorted by frequency)")
    return _png(figure)


def _draw_usage(ax: Axes, level: str, counts: np.ndarray) -> None:
    size = len(counts)
    total = counts.sum()
    used = int((counts > 0).sum())
    ordered = np.sort(counts)[::-1]
    share = ordered / total if total else ordered
    ax.bar(np.arange(size), share, width=1.0, color="C0", linewidth=0)
    if 0 < used < size:
        # Unused codes have no bar; mark where they start so an empty tail reads as a finding.
        ax.axvspan(used - 0.5, size - 0.5, color="0.85", label=f"{size - used} unused")
        ax.legend(fontsize="small")
    if total:
        p = counts[counts > 0] / total
        perplexity = float(np.exp(-(p * np.log(p)).sum()))
        stats = f"{used}/{size} codes used ({used / size:.0%}), perplexity {perplexity:.1f}"
    else:
        stats = f"no codes counted (K={size})"
    # Long tails span decades: a log axis keeps the rare codes visible beside the frequent ones.
    positive = share[share > 0]
    if len(positive) and positive.max() / positive.min() > 100:
        ax.set_yscale("log")
    ax.set_xlim(-0.5, size - 0.5)
    ax.set_title(f"{level}: {stats}", fontsize="medium")
    ax.set_xlabel("code rank (most frequent first)")
    ax.set_ylabel("share of codes")


def _new_figure(columns: int, rows: int) -> MplFigure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    figure = MplFigure(
        figsize=(_PANEL_SIZE[0] * columns, _PANEL_SIZE[1] * rows + 0.4),
        dpi=_DPI,
        layout="constrained",
    )
    FigureCanvasAgg(figure)
    return figure


def _png(figure: MplFigure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()
