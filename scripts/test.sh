#!/usr/bin/env bash
# Set up, lint, then run the test suite (slow and GPU tests are skipped; see docs/development.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
python -m pytest "$@"
