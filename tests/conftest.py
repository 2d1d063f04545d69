"""Settings for every test process and the Ray processes it starts."""

from __future__ import annotations

import os

# Ray Train's controller polls its workers every 2 s by default, so each training run outlived its
# last step by up to 2 s; the suite has dozens of them. Set before any Ray starts, so that the
# controllers of this process' Ray and of the `vqpipe` processes the tests start inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


# The test files that use the shared_run fixture.
SHARED_RUN_READERS = frozenset(
    {
        "tests/pipelines/test_end_to_end.py",
        "tests/pipelines/test_integrity.py",
        "tests/pipelines/test_reproducible.py",
        "tests/pipelines/evaluation/test_published_figures.py",
        "tests/pipelines/stages/test_stage_settings.py",
    }
)


def pytest_xdist_make_scheduler(config, log):
    """With pytest-xdist (`-n 2`): each test file whole on one worker, and tests/cluster/ whole on one.

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
            path = nodeid.split("::", 1)[0]
            if path.startswith("tests/cluster/"):
                return "tests/cluster/"
            return "shared-run" if path in SHARED_RUN_READERS else path

    return ByFile(config, log)
