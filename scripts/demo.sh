#!/usr/bin/env bash
# Set up, then run the whole pipeline on the generated demo corpus (configs/demo.yaml).
# Extra arguments go to `vqpipe run`, e.g. --set train_vqvae.steps=100.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs
# Let Python keep the bytecode it compiles in .venv (see setup.sh): no process compiles a module twice.
unset PYTHONDONTWRITEBYTECODE
echo "Setting up .venv (log: runs/setup.log)"
if ! bash scripts/setup.sh > runs/setup.log 2>&1; then
  cat runs/setup.log
  echo "setup failed (log above: runs/setup.log)"
  exit 1
fi
. .venv/bin/activate
vqpipe run configs/demo.yaml "$@"
echo
echo "Results: runs/demo (reconstructions: runs/demo/train_vqvae/reconstructions.png,"
echo "samples: runs/demo/sample/grid-*.png, report: runs/demo/evaluate/report.html)."
echo "Browse the MLflow runs with: .venv/bin/mlflow ui --backend-store-uri sqlite:///runs/demo/mlflow.db"
