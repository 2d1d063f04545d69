"""Cluster entry point: `ray job submit ... -- python -m jobs.tokenize CONFIG.yaml [--set k=v ...]`.

Same as `vqpipe tokenize`; with `ray.address: auto` in the config (or RAY_ADDRESS set by
`ray job submit`) it joins the cluster the job runs on.
"""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["tokenize", *sys.argv[1:]]))
