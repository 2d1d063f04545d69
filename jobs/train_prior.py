"""Cluster entry point: `ray job submit ... -- python -m jobs.train_prior CONFIG.yaml [--set k=v ...]`.

Same as `vqpipe train-prior`; with `ray.address: auto` in the config (or RAY_ADDRESS set by
`ray job submit`) it joins the cluster the job runs on.
"""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-prior", *sys.argv[1:]]))
