"""Settings for every test process and the Ray processes it starts."""

from __future__ import annotations

import os

# Ray Train's controller polls its workers every 2 s by default, so each training run outlived its
# last step by up to 2 s; the suite has dozens of them. Set before any Ray starts, so that the
# controllers of this process' Ray and of the `vqpipe` processes the tests start inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def pytest_xdist_make_scheduler(config, log):
    """With pytest-xdist (`-n 2`): each test file whole on one worker, and tests/cluster/ whole on one.

    A file's module-scoped pipeline run then happens once, and the cluster package's services (a
    3-node Ray cluster, an S3 server, an MLflow server: package-scoped fixtures) start once. The
    xdist_group mark cannot do this here: xdist groups by editing a private attribute of the test
    item that this pytest no longer reads.
    """
    from xdist.scheduler import LoadScopeScheduling

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "tests/cluster/" if path.startswith("tests/cluster/") else path

    return ByFile(config, log)
