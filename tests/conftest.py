"""Test-run wide settings: how ``pytest -n N`` (pytest-xdist) shares the tests among workers.

``scripts/test.sh`` runs the suite on two workers with ``--dist loadgroup``. Each test module goes
to one worker as a whole, so its module-scoped pipeline run happens once; the cluster tests share
one worker, because their Ray cluster, S3 server and MLflow server are package-scoped fixtures
that would otherwise start once per worker.
"""

from __future__ import annotations

import pytest


def pytest_itemcollected(item: pytest.Item) -> None:
    # Marked as each test is collected: xdist reads the marks when collection is modified.
    path = item.nodeid.split("::", 1)[0]
    group = "cluster" if path.startswith("tests/cluster/") else path
    item.add_marker(pytest.mark.xdist_group(group))
