"""Cluster entry point: `ray job submit ... -- python -m jobs.sample CONFIG.yaml [--set k=v ...]`.

Same as `vqpipe sample`; with `ray.address: auto` in the config (or RAY_ADDRESS set by
`ray job submit`) it joins the cluster the job runs on.
"""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["sample", *sys.argv[1:]]))
