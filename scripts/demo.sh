#!/usr/bin/env bash
# Set up, then run the whole pipeline on the generated demo corpus (configs/demo.yaml).
# Extra arguments go to `vqpipe run`, e.g. --set train_vqvae.steps=100.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
vqpipe run configs/demo.yaml "$@"
echo
echo "Results: runs/demo (reconstructions: runs/demo/train_vqvae/reconstructions.png,"
echo "samples: runs/demo/sample/grid-*.png, report: runs/demo/evaluate/report.html)."
echo "Browse the MLflow runs with: .venv/bin/mlflow ui --backend-store-uri sqlite:///runs/demo/mlflow.db"
