"""Cluster entry point for one stage:

    ray job submit ... -- python -m jobs.stage STAGE CONFIG.yaml [--set k=v ...] [--force]

STAGE is a stage's name or CLI verb (``train_vqvae`` or ``train-vqvae``); the same as
``vqpipe STAGE``. With ``ray.address: auto`` in the config (or RAY_ADDRESS set by ``ray job
submit``) it joins the cluster the job runs on; a stage that is up to date skips itself, so an
external scheduler can chain the stages.
"""

from __future__ import annotations

import sys

from jobs.cli import main as cli_main
from pipelines.errors import ConfigError
from pipelines.stages import get_stage, stage_names

USAGE = (
    "usage: python -m jobs.stage STAGE CONFIG.yaml [--set k=v ...] [--force]\n"
    f"STAGE: one of {', '.join(stage_names())}"
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    try:
        spec = get_stage(argv[0])
    except ConfigError as err:
        print(f"vqpipe: error: {err}", file=sys.stderr)
        return 2
    return cli_main([spec.verb, *argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
