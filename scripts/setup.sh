#!/usr/bin/env bash
# Create ./.venv (if missing) and install the project with its test tools.
# TORCH_SPEC picks the torch build: the default pins a release; on a GPU machine install the CUDA
# build of your choice first (pip keeps an installed torch that satisfies the requirement).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
python -m pip install --quiet -e ".[test]"
