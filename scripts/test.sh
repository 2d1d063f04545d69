#!/usr/bin/env bash
# Set up, lint, then run the test suite (slow and GPU tests are skipped; see docs/development.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
# TEST_WORKERS=2 runs the tests on two workers, each test file whole on one of them (its
# module-scoped pipeline run happens once); the default, 0, runs them in this process.
python -m pytest -n "${TEST_WORKERS:-0}" --dist loadfile "$@"
