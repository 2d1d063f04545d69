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
# Bytecode: where Python may write it (PYTHONDONTWRITEBYTECODE unset, its default), each module is
# compiled on its first import, once, and only the modules a run imports (a fraction of what is
# installed); so pip installs without compiling. Where it may not, every process would compile
# every module it imports, so all of the environment is compiled here, on every core.
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install --quiet --no-compile "${TORCH_SPEC:-torch==2.13.0}"
fi
python -m pip install --quiet --no-compile -e ".[test]"
if [ -n "${PYTHONDONTWRITEBYTECODE:-}" ]; then
  # As pip does, a file that does not compile (a template, an example for another Python) is left.
  python -m compileall -q -j 0 "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    >/dev/null || true
fi
