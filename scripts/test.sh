#!/usr/bin/env bash
# Set up, lint, then run the test suite (slow and GPU tests are skipped; see docs/development.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
# Two workers, each test file whole on one of them (its module-scoped pipeline run happens once);
# TEST_WORKERS=0 runs everything in this process.
python -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
