"""Settings for every test process and the Ray processes it starts; the session's fixtures."""

from __future__ import annotations

import json
import os

import pytest

# Ray Train's controller polls its workers every 2 s by default, so each training run outlived its
# last step by up to 2 s; the suite has dozens of them. Set before any Ray starts, so that the
# controllers of this process' Ray and of the `vqpipe` processes the tests start inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


# The test files that use the shared_run fixture.
SHARED_RUN_READERS = frozenset(
    {
        "tests/jobs/test_console.py",
        "tests/pipelines/test_end_to_end.py",
        "tests/pipelines/test_integrity.py",
        "tests/pipelines/test_reproducible.py",
        "tests/pipelines/evaluation/test_published_figures.py",
        "tests/pipelines/stages/test_stage_settings.py",
    }
)


# Seconds each of the longest scopes took (a fresh clone's run on 2 cores): the scheduler hands
# out the longest first, so that the last scopes to start are short and the two workers end
# together. Scopes not listed are shorter than any listed; among them, more tests go first.
SCOPE_SECONDS = {
    "tests/cluster/": 590,
    "shared-run": 360,
    "tests/pipelines/test_families.py": 130,
    "tests/pipelines/test_pinned_tokenizer.py": 90,
    "tests/pipelines/test_three_levels.py": 85,
    "tests/pipelines/test_unlabelled.py": 75,
    "tests/pipelines/stages/test_train_prior.py": 60,
    "tests/pipelines/test_growing_corpus.py": 55,
    "tests/pipelines/evaluation/test_metrics.py": 55,
    "tests/pipelines/stages/test_tokenize.py": 50,
    "tests/pipelines/stages/test_sample.py": 45,
    "tests/pipelines/test_training.py": 40,
    "tests/pipelines/stages/test_train_vqvae.py": 40,
}


def scope_of(nodeid: str) -> str:
    """The scope a test runs in under pytest-xdist: its file, tests/cluster/ whole, or the
    files that read the shared run together."""
    path = nodeid.split("::", 1)[0]
    if path.startswith("tests/cluster/"):
        return "tests/cluster/"
    return "shared-run" if path in SHARED_RUN_READERS else path


def pytest_xdist_make_scheduler(config, log):
    """With pytest-xdist (`-n 2`): each test file whole on one worker, and tests/cluster/ whole on
    one; the longest scopes first (``SCOPE_SECONDS``).

    A file's module-scoped pipeline run then happens once, and the cluster package's services (a
    3-node Ray cluster, an S3 server, an MLflow server: package-scoped fixtures) start once. The
    files that read the session's shared pipeline run (``shared_run`` in tests/pipelines/conftest.py)
    go to one worker together, so that run happens once too. The
    xdist_group mark cannot do this here: xdist groups by editing a private attribute of the test
    item that this pytest no longer reads.
    """
    from xdist.scheduler import LoadScopeScheduling

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope_of(nodeid)

        def _assign_work_unit(self, node) -> None:
            longest = max(
                self.workqueue,
                key=lambda scope: (SCOPE_SECONDS.get(scope, 0), len(self.workqueue[scope])),
            )
            self.workqueue.move_to_end(longest, last=False)
            super()._assign_work_unit(node)

    return ByFile(config, log)


# The session's fixtures for the tests under tests/pipelines/ and tests/jobs/ (the helpers they use
# are in tests/pipelines/conftest.py): a local Ray in this process, and the shared run.


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray (2 CPUs, no dashboard), shared by every pipeline test of the session."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=256 * 1024**2,
            log_to_driver=False,
        )
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_run(ray_local, tmp_path_factory):
    """Every stage once on the shared config, by `vqpipe run` (its MLflow parent run named
    "first"). Tests must leave its outputs as they found them: a test that changes them wraps
    the change in ``restored(shared_run, stages)``."""
    from pipelines.config import parse_config
    from pipelines.manifest import read_manifest
    from pipelines.runner import StageOutcome
    from pipelines.stages import STAGES
    from tests.pipelines.conftest import SharedRun, shared_raw_config, vqpipe

    root = tmp_path_factory.mktemp("shared")
    raw = shared_raw_config(str(root / "out"), str(root / "corpus"))
    config = root / "config.json"
    config.write_text(json.dumps(raw))
    done = vqpipe("run", str(config), "--set", "mlflow.run_name=first")
    assert done.returncode == 0, done.stdout + done.stderr
    cfg = parse_config(raw)
    outcomes = {
        spec.name: StageOutcome(read_manifest(cfg.output_dir, spec.manifest), skipped=False)
        for spec in STAGES
    }
    return SharedRun(cfg, outcomes, str(root), done)


@pytest.fixture(scope="session")
def shared_rerun(shared_run, tmp_path_factory) -> dict:
    """The shared config run again, in this process, in another folder: the outcome of each
    stage (with the config sections it read). Under pytest-xdist the other workers' tests keep
    the cores busy meanwhile (each runs Ray jobs of its own); run alone, a CPU-bound process
    competes with it."""
    from pipelines.config import parse_config
    from pipelines.runner import run_stages
    from tests.pipelines.conftest import competing_processes

    raw = shared_run.raw_config(str(tmp_path_factory.mktemp("rerun") / "out"))
    others = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) - 1
    with competing_processes(0 if others else 1):
        return run_stages(parse_config(raw), run_name="rerun")
