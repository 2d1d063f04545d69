"""What `vqpipe run` prints: a line per stage, progress, a summary; Ray's logs in <output_dir>/logs.

The CLI runs as a user runs it, in its own process with its stdout and stderr to pipes (not a
terminal), on a tiny generated corpus with a real local Ray: the session's shared run
(tests/conftest.py) is such a run, and the commands that redo a stage run on a copy of it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from pipelines import console, logs
from pipelines.console import Console
from pipelines.stages import STAGES
from tests.pipelines.conftest import SHARED_CLASSES, SHARED_CORRUPT, SHARED_PER_CLASS, vqpipe

# What Ray's C++ core prints on the driver's stderr (once per process) when Ray Data starts an
# actor pool: its constructor arguments are object refs and its actors restartable.
RAY_CORE_WARNING = "has constructor arguments in the object store and max_restarts > 0"
# Ray's own console output: Ray Data's execution plans and dataset lines, Ray Train's reports,
# Ray's C++ core's log lines.
RAY_NOISE = (
    "Execution plan of Dataset",
    "Starting execution of Dataset",
    "execution finished in",
    "Reporting training result",
    "Checkpoint successfully created",
    "(TrainController pid=",
    RAY_CORE_WARNING,
)
BF16_WARNING = "precision bf16 applies on GPU only"


@pytest.fixture(scope="module")
def first_run(shared_run):
    """What `vqpipe run` printed in the shared run (tests/conftest.py): four classes of six images
    and two corrupt files, bf16 asked of both priors (on CPU each warns once)."""
    return shared_run.console


@pytest.fixture(scope="module")
def config(shared_run, tmp_path_factory):
    """The shared run's finished stages copied to another output_dir, with their config, for the
    commands below to redo stages on (its MLflow store and logs start empty); (path, output_dir)."""
    root = tmp_path_factory.mktemp("console")
    output_dir = str(root / "out")
    shutil.copytree(
        shared_run.cfg.output_dir,
        output_dir,
        ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts", "logs"),
    )
    path = root / "config.json"
    path.write_text(json.dumps(shared_run.raw_config(output_dir)))
    return str(path), output_dir


def test_each_stage_has_a_start_line_and_a_summary(first_run, shared_run):
    output_dir = shared_run.cfg.output_dir
    lines = first_run.stdout.splitlines()
    assert (
        lines[0]
        == f"vqpipe: logs in {os.path.join(output_dir, 'logs')} (--verbose shows them here)"
    )
    for spec in STAGES:
        assert f"{spec.name}: {spec.description}" in lines, spec.name
        done = [line for line in lines if line.startswith(f"{spec.name}: done in ")]
        assert len(done) == 1, spec.name
    summary = [line for line in lines if line.startswith("train_vqvae: done in ")][0]
    assert "validation/mse" in summary
    assert "vqpipe finished:" in lines


def test_training_and_tokenize_show_plain_progress_lines(first_run):
    out = first_run.stdout
    # Not a terminal: plain lines, the last one at the end of the work.
    assert re.search(r"^  train_vqvae  step 6/6 \(100%\)  loss \d", out, re.MULTILINE), out
    for level in ("top", "bottom"):
        assert re.search(rf"^  train_prior {level}  step 4/4 \(100%\)", out, re.MULTILINE), out
    steps = [int(m) for m in re.findall(r"^  train_vqvae  step (\d+)/6", out, re.MULTILINE)]
    # In order and ending at the last step. How many lines come between depends on how fast the
    # steps run against rank 0's reports (about one a second); the cadence itself is tested below
    # without Ray.
    assert steps == sorted(steps) and steps[-1] == 6, out
    match = re.search(r"^  tokenize  images (\d+)/(\d+) \(100%\)  shards (\d+)", out, re.MULTILINE)
    assert match, out
    images = len(SHARED_CLASSES) * SHARED_PER_CLASS + SHARED_CORRUPT  # the bad files counted
    assert match[1] == match[2] == str(images)
    assert "\x1b[" not in out  # no terminal control codes in a pipe


def test_ray_logs_go_to_the_log_folder_not_the_console(first_run, shared_run):
    output_dir = shared_run.cfg.output_dir
    console = first_run.stdout + first_run.stderr
    for noise in RAY_NOISE:
        assert noise not in console, noise
    log_dir = os.path.join(output_dir, "logs")
    with open(os.path.join(log_dir, "vqpipe.log")) as f:
        driver_log = f.read()
    assert "Execution plan of Dataset" in driver_log
    assert "execution finished in" in driver_log
    with open(os.path.join(log_dir, "ray-workers.log")) as f:
        workers_log = f.read()
    assert "(TrainController pid=" in workers_log
    assert BF16_WARNING in workers_log
    with open(os.path.join(log_dir, "ray-core.log")) as f:
        assert RAY_CORE_WARNING in f.read()


def test_a_repeated_warning_is_shown_once_with_its_count(first_run):
    lines = first_run.stdout.splitlines()
    shown = [line for line in lines if line.startswith("warning: ") and BF16_WARNING in line]
    assert len(shown) == 1, lines
    counted = [line for line in lines if BF16_WARNING in line and "(2 times)" in line]
    assert len(counted) == 1 and counted[0].startswith("train_prior: warning "), lines
    # Each bad input is named once, by the first stage that read it; the stages after it that
    # read it again add to its count, given at the end of the run.
    for name in ("broken-000", "broken-001"):
        named = [line for line in lines if line.startswith("warning: ") and name in line]
        assert len(named) == 1, lines
        total = [line for line in lines if name in line and "times in all)" in line]
        assert len(total) == 1 and total[0].startswith("vqpipe: warning "), lines
        assert int(re.search(r"\((\d+) times in all\)", total[0])[1]) >= 2


def test_verbose_shows_rays_logs_on_the_console(first_run, config):
    path, _ = config
    done = vqpipe("--verbose", "tokenize", path, "--force")
    assert done.returncode == 0, done.stdout + done.stderr
    console = done.stdout + done.stderr
    assert "Execution plan of Dataset" in console
    assert "tokenize: done in " in done.stdout


def test_a_failing_stage_says_so_and_where_the_logs_are(first_run, config):
    path, output_dir = config
    done = vqpipe("sample", path, "--force", "--set", "sample.classes=[hexagon]")
    assert done.returncode == 2
    assert "sample: failed after " in done.stdout
    # The setting is checked before Ray starts (a local Ray names its dashboard when it does).
    assert "Ray dashboard: " in first_run.stdout and "Ray dashboard: " not in done.stdout
    assert "hexagon" in done.stderr
    assert f"logs are in {os.path.join(output_dir, 'logs')}" in done.stderr


@pytest.mark.parametrize(
    ("signum", "command"),
    [
        pytest.param(signal.SIGINT, ["sample", "--force"], id="SIGINT"),
        pytest.param(signal.SIGTERM, ["sample", "--force"], id="SIGTERM"),
        # Ctrl-C while sampling after a training stage in the same process, as in the demo: Ray
        # Train leaves its SIGINT handler behind after a run, and it took the Ctrl-C and did
        # nothing (tests/pipelines/test_interrupts.py has the quick version).
        pytest.param(
            signal.SIGINT,
            ["run", "--force", "train_prior"],
            id="SIGINT-after-training",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_a_signal_stops_sampling_at_once(first_run, config, tmp_path, signum, command):
    path, output_dir = config
    log = os.path.join(output_dir, "logs", "vqpipe.log")
    logged_before = os.path.getsize(log) if os.path.exists(log) else 0
    per_class = 500  # minutes of sampling
    draws = per_class * len(SHARED_CLASSES)
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        run = subprocess.Popen(
            [sys.executable, "-m", "jobs.cli", command[0], path, *command[1:]]
            + ["--set", f"sample.per_class={per_class}"]
            + ["--set", "sample.rejection.enabled=false"],
            stdout=out,
            stderr=err,
            env={**os.environ, "RAY_DEDUP_LOGS": "1"},
        )
        try:
            _wait_for_log_line(run, log, logged_before, rf"sample: \d+ of {draws} draws")
            run.send_signal(signum)
            sent = time.monotonic()
            run.wait(timeout=60)
            took = time.monotonic() - sent
        finally:
            run.kill()
    stdout, stderr = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert run.returncode == 128 + signum, stdout + stderr
    assert "sample: failed after " in stdout
    where = os.path.join(output_dir, "logs")
    assert stderr.endswith(
        f"vqpipe: interrupted\nvqpipe: Ray's and the workers' logs are in {where}\n"
    ), stderr
    for dump in ("*** SIG", "PC: @", "Stack trace", "Traceback"):
        assert dump not in stderr, stderr
    assert took < 8, f"{took:.1f} s from the signal to the end of the process"


def _wait_for_log_line(run: subprocess.Popen, log: str, offset: int, pattern: str) -> None:
    """Wait until ``log`` has a line matching ``pattern`` past ``offset`` (while ``run`` runs)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and run.poll() is None:
        with open(log) as f:
            f.seek(offset)
            if re.search(pattern, f.read()):
                return
        time.sleep(0.2)
    raise AssertionError(f"no line like {pattern!r} in {log} (exit status {run.poll()})")


# Without Ray: the console and the log routing on their own.


def test_plain_progress_prints_a_line_per_fifth_of_the_work():
    stream = io.StringIO()
    shown = Console(stream)
    with console.active(shown), shown.progress("tokenize", 200, "images") as bar:
        for _ in range(200):
            bar.update(advance=1, shards=3)
    lines = stream.getvalue().splitlines()
    done = [int(re.match(r"  tokenize  images (\d+)/200 ", line)[1]) for line in lines]
    assert done == list(range(40, 201, 40)), lines
    assert lines[-1].startswith("  tokenize  images 200/200 (100%)  shards 3  ")


def test_warnings_of_one_log_call_are_capped_and_counted(tmp_path):
    stream = io.StringIO()
    shown = Console(stream)
    log = logging.getLogger("vqpipe")
    with console.active(shown), logs.routed_logs(str(tmp_path), shown):
        for i in range(10):
            log.warning("skipping bad input %s", f"file-{i}")
        log.warning("skipping bad input %s", "file-0")
        shown.flush_warnings("tokenize")
    lines = stream.getvalue().splitlines()
    assert lines == [
        "warning: skipping bad input file-0",
        "warning: skipping bad input file-1",
        "warning: skipping bad input file-2",
        "tokenize: warning 'skipping bad input file-0' (2 times)",
        "tokenize: 7 more warning(s) like 'skipping bad input %s'",
    ]
    with open(tmp_path / "logs" / "vqpipe.log") as f:
        assert len([line for line in f if "skipping bad input" in line]) == 11


def test_the_eta_stays_steady_when_steps_come_in_bursts():
    # Training as the console sees it: a poll every second, and rank 0's steps arriving in bursts,
    # 10 steps 5 s apart three times, then 10 more after a 45 s pause (an evaluation): 40 steps a
    # minute on average. The last interval's rate swings between 2 and 0.22 steps/s.
    now = [0.0]
    shown = Console(io.StringIO(), clock=lambda: now[0])
    total, per_minute, gaps = 3000, 40, [5, 5, 5, 45]
    errors, last_interval_errors = [], []
    with console.active(shown), shown.progress("train_prior bottom", total, "step") as bar:
        done = 0
        for burst in range(160):
            gap = gaps[burst % len(gaps)]
            for second in range(1, gap + 1):
                now[0] += 1
                done += 10 if second == gap else 0
                bar.update(done=done)
            if now[0] < 120:  # the first two minutes
                continue
            steady_eta = (total - done) / (per_minute / 60)
            errors.append(abs(bar.eta() / steady_eta - 1))
            last_interval_errors.append(abs((total - done) / (10 / gap) / steady_eta - 1))
    assert max(last_interval_errors) > 1.0  # what the ETA used to be based on: off by 2x and more
    assert max(errors) < 0.25, f"ETA off by up to {max(errors):.0%} of the steady ETA"
