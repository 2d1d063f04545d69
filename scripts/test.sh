#!/usr/bin/env bash
# Set up, lint, then run the test suite (slow and GPU tests are skipped; see docs/development.md).
set -euo pipefail
cd "$(dirname "$0")/.."
# Let Python keep the bytecode it compiles in .venv (see setup.sh): no process compiles a module twice.
unset PYTHONDONTWRITEBYTECODE
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
# Two pytest-xdist workers by default: each test file whole on one of them, and tests/cluster/
# whole on one (tests/conftest.py); TEST_WORKERS=0 runs every test in this process.
python -m pytest -n "${TEST_WORKERS:-2}" "$@"
