"""Where the logs go while the CLI runs stages: ``<output_dir>/logs/``, not the console.

- ``vqpipe.log``: every log record of this process at INFO and above: the pipeline's own
  (``vqpipe``), Ray's and Ray Data's (execution plans, "Dataset ... finished", Ray Train's
  driver side), MLflow's, and Python warnings.
- ``ray-workers.log``: what Ray's worker processes print (tasks, actors, Ray Train's controller
  and workers), each line prefixed as Ray prefixes it on a console: ``(TaskName pid=123)``.
- ``ray-core.log``: what Ray's C++ core in this process writes to the process's stderr once Ray
  has started (``[... E pid tid] core_worker.cc:...`` lines such as Ray Data's "Actor ... has
  constructor arguments in the object store and max_restarts > 0"), and anything else native code
  writes there. Python's own ``sys.stderr`` keeps going to the console.

The console (``pipelines.console``) gets the pipeline's warnings, from this process and from the
workers, each once, and errors from any logger. Ray Data's progress bars are off; the stages
show their own progress.

Worker processes mark their pipeline log records (``WORKER_MARK`` + JSON, set up by
``setup_worker_logging``, a Ray ``worker_process_setup_hook``) so that this process can tell a
pipeline warning from the rest of a worker's output.

With ``verbose`` everything goes to the console as before, and to the log file as well. When
``output_dir`` is a URL the logs go to a local temporary folder, named on the console.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from pipelines.console import Console
from pipelines.data import storage

LOG_DIR = "logs"
DRIVER_LOG = "vqpipe.log"
WORKERS_LOG = "ray-workers.log"
NATIVE_LOG = "ray-core.log"
WORKER_MARK = "vqpipe-log "
WORKER_HOOK = "pipelines.logs.setup_worker_logging"
# Loggers that print to the console through handlers of their own (they do not propagate).
LIBRARY_LOGGERS = ("ray", "ray.data", "mlflow")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_OUR_DISPATCH = "vqpipe_worker_output"
_RAY_DISPATCH = "ray_print_logs"


def log_dir_for(output_dir: str) -> str:
    """The folder the logs of a run in ``output_dir`` go to."""
    if storage.is_url(output_dir):
        return tempfile.mkdtemp(prefix="vqpipe-logs-")
    return os.path.join(output_dir, LOG_DIR)


class _ToConsole(logging.Handler):
    """Pipeline warnings and any logger's errors, to the console (each message once)."""

    def __init__(self, console: Console):
        super().__init__(logging.WARNING)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        ours = record.name == "vqpipe" or record.name.startswith("vqpipe.")
        if record.levelno >= logging.ERROR or ours:
            try:
                text = record.getMessage()
            except Exception:  # a malformed record must not break the run
                text = str(record.msg)
            if record.levelno >= logging.ERROR:
                text = f"{record.levelname.lower()} ({record.name}): {text}"
            self.console.warning(text, template=str(record.msg))


@dataclass
class _Routing:
    console: Console
    verbose: bool
    log_dir: str
    workers_file: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    dispatch_swapped: bool = False
    console_fd: int | None = None  # the console's stderr while descriptor 2 goes to NATIVE_LOG
    python_stderr: Any = None  # sys.stderr before it was pointed at console_fd


_routing: _Routing | None = None


@contextmanager
def routed_logs(output_dir: str, console: Console, *, verbose: bool = False):
    """Send this process's logs, Ray's and the workers' output to the log folder while the
    block runs (to the console too with ``verbose``); yields the folder. Restores the logging
    setup on exit."""
    global _routing
    # Both configure their loggers on import: replace the handlers after that.
    import mlflow.utils.logging_utils  # noqa: F401
    import ray.data  # noqa: F401

    log_dir = log_dir_for(output_dir)
    driver_file = _FolderOnFirstRecord(os.path.join(log_dir, DRIVER_LOG), encoding="utf-8")
    driver_file.setLevel(logging.INFO)
    driver_file.setFormatter(logging.Formatter(FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    with ExitStack() as restore:
        restore.callback(driver_file.close)
        restore.enter_context(_records_routed(driver_file, console, verbose))
        restore.enter_context(_library_printing_routed(verbose))
        _routing = _Routing(console, verbose, log_dir)
        try:
            yield log_dir
        finally:
            detach_ray()
            if _routing.workers_file is not None:
                _routing.workers_file.close()
            _routing = None


@contextmanager
def _records_routed(driver_file: logging.Handler, console: Console, verbose: bool) -> Iterator:
    """Every log record of this process at INFO and above to ``driver_file``, Python warnings
    included; with ``verbose`` to stderr too, else the pipeline's warnings and every logger's
    errors to ``console``, and the libraries' own console handlers taken off."""
    root = logging.getLogger()
    root_level = root.level
    root.setLevel(logging.INFO)
    added: list[tuple[logging.Logger, logging.Handler]] = [(root, driver_file)]
    saved: list[tuple[logging.Logger, list[logging.Handler], bool]] = []
    if verbose:
        stderr = logging.StreamHandler(sys.stderr)
        stderr.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        added.append((root, stderr))
        added += [(logging.getLogger(name), driver_file) for name in LIBRARY_LOGGERS]
    else:
        added.append((root, _ToConsole(console)))
        for name in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            saved.append((logger, list(logger.handlers), logger.propagate))
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            # Through the root's handlers: the file, and errors to the console.
            logger.propagate = True
    for logger, handler in added:
        logger.addHandler(handler)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for logger, handler in added:
            logger.removeHandler(handler)
        for logger, handlers, propagate in saved:
            for handler in handlers:
                logger.addHandler(handler)
            logger.propagate = propagate
        root.setLevel(root_level)


@contextmanager
def _library_printing_routed(verbose: bool) -> Iterator:
    """Ray Data's progress bars off (unless ``verbose``), and what MLflow prints past its logger
    ("Created version '1' of model ...", to a stream of its own that it switches on and off
    itself) to the log file instead."""
    import mlflow.utils.logging_utils
    import ray.data

    data_context = ray.data.DataContext.get_current()
    progress_bars = data_context.enable_progress_bars
    data_context.enable_progress_bars = verbose
    mlflow_stream = mlflow.utils.logging_utils.MLFLOW_LOGGING_STREAM
    if not verbose:
        mlflow_stream.write = _LinesToLog(logging.getLogger("mlflow.events")).write
    try:
        yield
    finally:
        data_context.enable_progress_bars = progress_bars
        mlflow_stream.__dict__.pop("write", None)


class _FolderOnFirstRecord(logging.FileHandler):
    """A log file created, with its folder, at the first record: a command refused before it
    logs anything (a bad config, a bad checkpoint) leaves no folder behind."""

    def __init__(self, filename: str, encoding: str):
        super().__init__(filename, encoding=encoding, delay=True)

    def _open(self):
        os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
        return super()._open()


class _LinesToLog:
    """A text stream whose lines become INFO records of ``logger``."""

    def __init__(self, logger: logging.Logger):
        self.logger, self.pending = logger, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.strip():
                self.logger.info(line)
        return len(text)


def ray_init_options() -> dict[str, Any]:
    """What ``ray.init`` needs so that workers' output can be routed (see ``attach_ray``)."""
    if _routing is None or _routing.verbose:
        return {"log_to_driver": True}
    return {"log_to_driver": True, "runtime_env": {"worker_process_setup_hook": WORKER_HOOK}}


def attach_ray() -> None:
    """Route the output Ray forwards from its workers to ``ray-workers.log`` (and pipeline
    warnings to the console) instead of printing it, and what Ray's C++ core writes to this
    process's stderr to ``ray-core.log``. Call after ``ray.init``."""
    if _routing is None or _routing.verbose:
        return
    routing = _routing
    os.makedirs(routing.log_dir, exist_ok=True)
    if routing.console_fd is None:
        _native_stderr_to_file(routing, os.path.join(routing.log_dir, NATIVE_LOG))
    if routing.dispatch_swapped:
        return
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray: its own printing stays
        logging.getLogger("vqpipe").info("Ray workers' output cannot be routed; it is printed")
        return
    routing.workers_file = open(
        os.path.join(routing.log_dir, WORKERS_LOG), "a", encoding="utf-8", buffering=1
    )
    dispatcher.remove_handler(_RAY_DISPATCH)
    dispatcher.add_handler(_OUR_DISPATCH, functools.partial(_worker_output, routing))
    routing.dispatch_swapped = True


def detach_ray() -> None:
    """Give Ray back its own printing of workers' output, and this process its stderr."""
    if _routing is None:
        return
    _native_stderr_restored(_routing)
    if not _routing.dispatch_swapped:
        return
    from ray._private import worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    dispatcher.remove_handler(_OUR_DISPATCH)
    if worker.global_worker.connected:
        dispatcher.add_handler(
            _RAY_DISPATCH, functools.partial(worker.print_to_stdstream, ignore_prefix=False)
        )
    _routing.dispatch_swapped = False


def _native_stderr_to_file(routing: _Routing, path: str) -> None:
    """Point file descriptor 2 at ``path``, where C and C++ code writes its stderr (Ray's core
    logs its errors there, and its once-per-process warnings), and keep Python's ``sys.stderr``
    on the console: when it writes to descriptor 2, it now writes to a copy of it."""
    try:
        python_on_fd2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # replaced by a test or a notebook
        python_on_fd2 = False
    if python_on_fd2:
        sys.stderr.flush()
    routing.console_fd = os.dup(2)
    native = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(native, 2)
    os.close(native)
    if python_on_fd2:
        routing.python_stderr = sys.stderr
        sys.stderr = open(  # closed, not the descriptor, by _native_stderr_restored
            routing.console_fd,
            "w",
            encoding=sys.stderr.encoding,
            errors=sys.stderr.errors,
            buffering=1,
            closefd=False,
        )


def _native_stderr_restored(routing: _Routing) -> None:
    if routing.console_fd is None:
        return
    if routing.python_stderr is not None:
        sys.stderr.close()
        sys.stderr, routing.python_stderr = routing.python_stderr, None
    os.dup2(routing.console_fd, 2)
    os.close(routing.console_fd)
    routing.console_fd = None


def _worker_output(routing: _Routing, data: dict[str, Any]) -> None:
    """One batch of lines that Ray forwarded from a worker process."""
    name = data.get("actor_name") or data.get("task_name") or ""
    prefix = f"({name} pid={data.get('pid')})" if name else f"(pid={data.get('pid')})"
    if data.get("ip") and data.get("ip") != data.get("localhost"):
        prefix = f"{prefix[:-1]}, ip={data['ip']})"
    lines = data.get("lines", [])
    if data.get("pid") == "autoscaler":  # the monitor's whole log: keep its events, as Ray does
        from ray._private.worker import filter_autoscaler_events

        lines = list(filter_autoscaler_events(lines))
    written = []
    for line in lines:
        if line.startswith(WORKER_MARK):
            try:
                record = json.loads(line[len(WORKER_MARK) :])
                level, message = record["level"], record["message"]
            except (ValueError, KeyError, TypeError):
                written.append(f"{prefix} {line}")
                continue
            written.append(f"{prefix} {level} {record.get('name', 'vqpipe')}: {message}")
            if logging.getLevelName(level) >= logging.WARNING:
                routing.console.warning(message, template=record.get("template"))
        else:
            written.append(f"{prefix} {line}")
    with routing.lock:
        if routing.workers_file is not None and not routing.workers_file.closed:
            routing.workers_file.write("".join(f"{line}\n" for line in written))


class _MarkedFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message = f"{message}\n{self.formatException(record.exc_info)}"
        fields = {
            "level": record.levelname,
            "name": record.name,
            "template": str(record.msg),
            "message": message,
        }
        return WORKER_MARK + json.dumps(fields)


def setup_worker_logging() -> None:
    """Ray worker setup hook: the pipeline's log records, INFO and up, to stderr, marked."""
    logger = logging.getLogger("vqpipe")
    if any(isinstance(h.formatter, _MarkedFormatter) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_MarkedFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
