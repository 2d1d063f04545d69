"""Ctrl-C and SIGTERM while the CLI runs stages: either one stops the run at once.

While ``stop_on_signals()`` is active, SIGINT raises ``KeyboardInterrupt`` and SIGTERM raises
``Terminated`` (a ``KeyboardInterrupt``) in the main thread, wherever it waits: in ``ray.get``,
or for the next block of a Ray dataset. The CLI then says the run was interrupted and ends the
process with ``exit_now``.

Ray replaces these handlers behind the CLI's back, so ``reclaim()`` puts them back after it:

- ``ray.init`` sets a SIGTERM handler of its own (it stops the local Ray and exits), and Ray's
  C++ core one that prints a stack dump ("*** SIGTERM received ...") first;
- each Ray Train run sets a SIGINT handler that asks the run's controller to abort, and leaves
  it set when the run is over: a Ctrl-C in a later stage (sampling, say) then goes to a
  controller that has finished, and nothing happens until the third one.

While a Ray Train run lasts its own handler stays: the first Ctrl-C aborts the run and exits
(``SystemExit``), which the CLI takes as an interruption too. Without the CLI (library use)
``reclaim()`` changes nothing.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (``kill``, ``ray job stop``, a scheduler ending the job)."""


def _raise(signum: int, frame: Any) -> None:
    if signum == signal.SIGTERM:
        raise Terminated()
    raise KeyboardInterrupt()


_active = False


def _main_thread() -> bool:
    # Python runs signal handlers in the main thread only, and only it may set them.
    return threading.current_thread() is threading.main_thread()


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise in the main thread while the block runs; the handlers of before
    are put back after it."""
    global _active
    if not _main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    for signum in SIGNALS:
        signal.signal(signum, _raise)
    _active = True
    try:
        yield
    finally:
        _active = False
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def reclaim() -> None:
    """Set the handlers of ``stop_on_signals`` again, after Ray set its own (see above)."""
    if _active and _main_thread():
        for signum in SIGNALS:
            signal.signal(signum, _raise)


def exit_code(stop: BaseException) -> int:
    """The shell's exit status for a run stopped by ``stop``: 128 + the signal's number."""
    return 128 + (signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)


def exit_now(stop: BaseException) -> NoReturn:
    """End the process of a run that ``stop`` interrupted: stop the Ray this process started
    (or leave the cluster), then exit with ``exit_code(stop)`` without Python's finalisation,
    which takes many seconds in a process that holds torch, Ray and MLflow. A second signal
    meanwhile exits at once."""
    code = exit_code(stop)
    if _main_thread():
        for signum in SIGNALS:
            signal.signal(signum, lambda *_: os._exit(code))
    sys.stdout.flush()
    sys.stderr.flush()
    import ray

    if ray.is_initialized():
        ray.shutdown()
    os._exit(code)
