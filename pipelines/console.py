"""What a user sees while the pipeline runs: a line per stage, its progress, its summary.

    train_vqvae: train the autoencoder (VQ-VAE-2, VQ-VAE or dVAE) on the corpus with Ray Train
      train_vqvae  step 506/1000 (50%)  loss 0.01676  249 img/s  ETA 1m04s
    train_vqvae: done in 4m12s  validation/mse=0.0101, validation/perplexity/top=25.58, ...

On a terminal the progress is a live bar (rich); elsewhere (a pipe, CI, ``ray job logs``) it is
a plain line at every fifth of the work and at least every ``PLAIN_EVERY_SECONDS``.

Rates and ETAs come from the work done over the time it took, both discounted by half every
``RATE_HALF_LIFE_SECONDS``. Training reports its steps in bursts with pauses between them
(evaluations, checkpoints, a new epoch's data), so the rate of the last interval, or of the last
half minute, swings several-fold from one line to the next; the discounted rate follows a lasting
change of speed within a few minutes and keeps the ETA steady in between.

Warnings are shown once: a repeat of the same message is counted, not printed, and the stage's
last lines say how often each repeated warning came ("(N times)"). Beyond ``SHOWN_PER_TEMPLATE``
different messages from one ``log.warning`` call, the rest are counted under it.

The stages and the runner speak to ``current()``, the console of the running CLI command; used
as a library (no CLI), ``current()`` is a console that prints nothing.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

PLAIN_EVERY_SECONDS = 120.0
PLAIN_LINES = 5  # a plain progress line at every fifth of the work
RATE_HALF_LIFE_SECONDS = 120.0  # the past's weight in rates and ETAs halves every 2 minutes
SHOWN_PER_TEMPLATE = 3


def format_seconds(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@dataclass
class _Rate:
    """Units per second: the units done over the time they took, both discounted by half every
    ``RATE_HALF_LIFE_SECONDS``. Early on this is about the plain average since the first sample;
    unlike a moving average of per-interval rates it needs no starting value, and it weighs each
    interval by its length however irregular the intervals are."""

    last: tuple[float, float] | None = None  # (time, done) of the latest sample
    done: float = 0.0  # discounted units
    seconds: float = 0.0  # discounted time

    def add(self, now: float, done: float) -> None:
        if self.last is not None:
            then, before = self.last
            elapsed = max(now - then, 0.0)
            keep = 0.5 ** (elapsed / RATE_HALF_LIFE_SECONDS)
            self.done = self.done * keep + (done - before)
            self.seconds = self.seconds * keep + elapsed
        self.last = (now, done)

    def per_second(self) -> float | None:
        return self.done / self.seconds if self.seconds > 0 else None

    def reset(self) -> None:
        self.last, self.done, self.seconds = None, 0.0, 0.0


class Progress:
    """How far one piece of work has gone: ``done`` of ``total`` ``unit``, with figures.

    ``rate_unit`` and ``rate_scale`` name the throughput shown: training counts steps but shows
    images per second (``rate_scale`` images per step). Thread-safe: a poller thread may update.
    """

    def __init__(
        self,
        console: Console,
        label: str,
        total: int | None,
        unit: str,
        rate_unit: str | None = None,
        rate_scale: float = 1.0,
        rate_from_start: bool = True,
    ):
        self.console, self.label, self.total, self.unit = console, label, total, unit
        self.rate_unit, self.rate_scale = rate_unit or f"{unit}/s", rate_scale
        self.done = 0
        self.figures: dict[str, Any] = {}
        self.rate = _Rate()
        if rate_from_start:  # else from the first update (work that starts after a while)
            self.rate.add(console.clock(), 0)
        self._lock = threading.Lock()
        self._next_line = 1  # in fifths of the total
        self._last_line = console.clock()
        self._printed_done = -1
        self._task = console._add_task(self)

    def update(self, done: int | None = None, advance: int = 0, **figures: Any) -> None:
        """Set ``done`` (or add ``advance``) and any named figures (loss=..., shards=...)."""
        with self._lock:
            now = self.console.clock()
            new = self.done + advance if done is None else done
            if new < self.done:  # a restarted worker resumed from an earlier checkpoint
                self.rate.reset()
            self.done = new
            self.figures.update({k: v for k, v in figures.items() if v is not None})
            self.rate.add(now, self.done)
            self.console._progressed(self, now)

    def per_second(self) -> float | None:
        rate = self.rate.per_second()
        return None if rate is None else rate * self.rate_scale

    def eta(self) -> float | None:
        rate = self.rate.per_second()
        if self.total is None or not rate:
            return None
        return max(self.total - self.done, 0) / rate

    def describe(self) -> str:
        """``step 500/1000 (50%)  loss 0.0412  410 img/s  ETA 1m10s``"""
        parts = [
            f"{self.unit} {self.done}/{self.total}" if self.total else f"{self.unit} {self.done}"
        ]
        if self.total:
            parts[0] += f" ({100 * self.done // self.total}%)"
        parts += [f"{name} {_format_value(value)}" for name, value in self.figures.items()]
        rate = self.per_second()
        if rate is not None:
            parts.append(
                f"{rate:.3g} {self.rate_unit}" if rate < 100 else f"{rate:.0f} {self.rate_unit}"
            )
        eta = self.eta()
        if eta is not None and self.total and self.done < self.total:
            parts.append(f"ETA {format_seconds(eta)}")
        return "  ".join(parts)

    def plain_due(self, now: float) -> bool:
        """Whether a plain line is due: a fifth of the work more, or a while without a line."""
        if self.done == self._printed_done:
            return False
        if self.total and self.done >= self.total:
            return True
        if self.total and self.done * PLAIN_LINES >= self._next_line * self.total:
            return True
        return now - self._last_line >= PLAIN_EVERY_SECONDS

    def printed(self, now: float) -> None:
        self._printed_done, self._last_line = self.done, now
        if self.total:
            self._next_line = self.done * PLAIN_LINES // self.total + 1

    def close(self) -> None:
        self.console._remove_task(self)


@dataclass
class _Warning:
    text: str
    template: str
    count: int = 0


class WarningLedger:
    """Every warning once; repeats counted. ``template`` groups the messages of one log call.

    ``stage_repeats`` says how often each warning came since the last call (a stage's end);
    ``run_repeats`` names those that also came back in later stages, with their total.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._total: dict[str, int] = {}
        self._since: dict[str, int] = {}
        self._summarised: dict[str, int] = {}
        self._per_template: dict[str, int] = {}
        self._held_back: dict[str, int] = {}

    def record(self, text: str, template: str | None = None) -> bool:
        """Count ``text``; True when it should be shown now (its first time)."""
        template = template or text
        with self._lock:
            if text in self._total:
                self._total[text] += 1
                self._since[text] = self._since.get(text, 0) + 1
                return False
            shown = self._per_template.get(template, 0)
            if shown >= SHOWN_PER_TEMPLATE:
                self._held_back[template] = self._held_back.get(template, 0) + 1
                return False
            self._per_template[template] = shown + 1
            self._total[text] = self._since[text] = 1
            return True

    def stage_repeats(self) -> list[str]:
        """Lines for the warnings that came more than once since the last call."""
        with self._lock:
            lines = []
            for text, count in self._since.items():
                if count > 1:
                    lines.append(f"warning {text!r} ({count} times)")
                    self._summarised[text] = self._total[text]
            lines += [
                f"{count} more warning(s) like {template!r}"
                for template, count in self._held_back.items()
            ]
            self._since.clear()
            self._held_back.clear()
        return lines

    def run_repeats(self) -> list[str]:
        """Lines for the warnings whose total is more than any stage's line said."""
        with self._lock:
            return [
                f"warning {text!r} ({count} times in all)"
                for text, count in self._total.items()
                if count > 1 and self._summarised.get(text) != count
            ]

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._total)


class Console:
    """The console of one CLI command. ``live``: a rich live display (a terminal), else plain
    lines; ``quiet``: no stage lines nor progress, warnings and errors only; ``clock``: the
    seconds that rates and the plain lines' cadence are measured in."""

    def __init__(
        self,
        stream: IO[str] | None = None,
        *,
        live: bool | None = None,
        quiet: bool = False,
        log_dir: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.stream = stream or sys.stdout
        self.clock = clock
        self.live = (self.stream.isatty() if live is None else live) and not quiet
        self.quiet = quiet
        self.log_dir = log_dir
        self.warnings = WarningLedger()
        self._lock = threading.RLock()
        self._tasks: list[Progress] = []
        self._rich = None
        self._rich_ids: dict[int, Any] = {}

    # -- lines ---------------------------------------------------------------------------------

    def line(self, text: str, *, always: bool = False) -> None:
        """Print one line (above a live display, if any); ``always`` prints even when quiet."""
        if self.quiet and not always:
            return
        with self._lock:
            if self._rich is not None:
                self._rich.console.print(text, markup=False, highlight=False, soft_wrap=True)
            else:
                self.stream.write(text + "\n")
                self.stream.flush()

    def warning(self, text: str, template: str | None = None) -> None:
        """A warning, shown the first time only (see WarningLedger)."""
        if self.warnings.record(text, template):
            self.line(f"warning: {text}", always=True)

    def stage_started(self, stage: str, description: str) -> None:
        self.line(f"{stage}: {description}")

    def stage_skipped(self, stage: str, summary: str) -> None:
        self.line(f"{stage}: up to date, skipped  {summary}".rstrip())

    def stage_finished(self, stage: str, seconds: float, summary: str) -> None:
        self.line(f"{stage}: done in {format_seconds(seconds)}  {summary}".rstrip())
        self.flush_warnings(stage)

    def stage_failed(self, stage: str, seconds: float) -> None:
        self.line(f"{stage}: failed after {format_seconds(seconds)}", always=True)
        self.flush_warnings(stage)

    def flush_warnings(self, where: str) -> None:
        """The warnings repeated since the last call (a stage's end), under ``where``."""
        for text in self.warnings.stage_repeats():
            self.line(f"{where}: {text}", always=True)

    def run_finished(self) -> None:
        """The warnings still unsummarised and those repeated across stages."""
        self.flush_warnings("vqpipe")
        for text in self.warnings.run_repeats():
            self.line(f"vqpipe: {text}", always=True)

    # -- progress ------------------------------------------------------------------------------

    @contextmanager
    def progress(
        self,
        label: str,
        total: int | None,
        unit: str,
        rate_unit: str | None = None,
        rate_scale: float = 1.0,
        rate_from_start: bool = True,
    ):
        """A ``Progress`` shown while the block runs."""
        bar = Progress(self, label, total, unit, rate_unit, rate_scale, rate_from_start)
        try:
            yield bar
        finally:
            bar.close()

    def _add_task(self, bar: Progress) -> Any:
        if self.quiet:
            return None
        with self._lock:
            self._tasks.append(bar)
            if self.live:
                self._start_live()
                self._rich_ids[id(bar)] = self._rich.add_task(bar.label, total=bar.total, detail="")

    def _remove_task(self, bar: Progress) -> None:
        if self.quiet:
            return
        with self._lock:
            if bar in self._tasks:
                self._tasks.remove(bar)
            if self._rich is not None:
                self._rich.remove_task(self._rich_ids.pop(id(bar)))
                if not self._tasks:
                    self._stop_live()
            elif bar.done != bar._printed_done:
                self._plain_line(bar, self.clock())

    def _progressed(self, bar: Progress, now: float) -> None:
        if self.quiet:
            return
        with self._lock:
            if self._rich is not None:
                task = self._rich_ids.get(id(bar))
                if task is not None:
                    self._rich.update(
                        task, completed=bar.done, total=bar.total, detail=bar.describe()
                    )
            elif not self.live and bar.plain_due(now):
                self._plain_line(bar, now)

    def _plain_line(self, bar: Progress, now: float) -> None:
        self.stream.write(f"  {bar.label}  {bar.describe()}\n")
        self.stream.flush()
        bar.printed(now)

    def _start_live(self) -> None:
        if self._rich is not None:
            return
        from rich.console import Console as RichConsole
        from rich.progress import BarColumn, TextColumn
        from rich.progress import Progress as RichProgress

        self._rich = RichProgress(
            TextColumn("  {task.description}"),
            BarColumn(bar_width=30),
            TextColumn("{task.fields[detail]}"),
            console=RichConsole(file=self.stream),
            transient=True,
        )
        self._rich.start()

    def _stop_live(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
            self._rich_ids.clear()

    def close(self) -> None:
        with self._lock:
            for bar in list(self._tasks):
                self._remove_task(bar)
            self._stop_live()


class _Silent(Console):
    """The console of library use: nothing printed, warnings not counted."""

    def __init__(self) -> None:
        super().__init__(stream=sys.stderr, live=False, quiet=True)

    def line(self, text: str, *, always: bool = False) -> None:
        pass

    def warning(self, text: str, template: str | None = None) -> None:
        pass


_SILENT = _Silent()
_current: Console = _SILENT


def current() -> Console:
    """The console of the running command, or a silent one."""
    return _current


@contextmanager
def active(console: Console):
    """Make ``console`` the current one while the block runs."""
    global _current
    previous, _current = _current, console
    try:
        yield console
    finally:
        console.close()
        _current = previous
