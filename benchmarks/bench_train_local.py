"""Steady-state training throughput of the train_vqvae stage against a plain PyTorch loop.

Both train the same VQ-VAE-2 (rosinality sizes: channels 128, 2 residual blocks of 32, D 64,
K 512 per level) on the same 64x64 RGB images with batch 32 and Adam, on this machine, in one run:

- baseline: one process, the images decoded into memory up front, random batches, torch's default
  threads; no Ray, no MLflow, no checkpoints;
- stage: ``train_vqvae`` through the runner with a local Ray (decoded-image cache, per-rank
  seeded reader with its shuffle buffer, Ray Train, MLflow), its img/s taken from the
  ``seconds_per_step`` it logs (wall time between log points, evaluation and checkpoints left
  out), after its first window.

The baseline is measured before and after the stage, so a change in the machine's load shows, and
at the niceness Ray gives its workers. The stage must reach 0.9x of the baseline.

    python benchmarks/bench_train_local.py                 # 512 images, 30 stage steps
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from pipelines.data.images import to_model_input
from vq_core.vqvae import VQVAE2, VQVAE2Config

MODEL = {
    "channels": 128,
    "res_blocks": 2,
    "res_channels": 32,
    "embed_dim": 64,
    "codebook_size_top": 512,
    "codebook_size_bottom": 512,
}
TARGET = 0.9
RAY_WORKER_NICENESS = 15


def baseline(images: np.ndarray, batch: int, steps: int, warmup: int) -> float:
    """Images per second of a plain single-process loop over in-memory uint8 images."""
    torch.manual_seed(0)
    model = VQVAE2(VQVAE2Config(**MODEL))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(images)
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        x = to_model_input(pixels[torch.from_numpy(rng.choice(len(images), batch))])
        loss = model(x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * batch / (time.perf_counter() - start)


def stage(workdir: str, corpus: str, args: argparse.Namespace) -> tuple[float, list[float]]:
    """(steady-state img/s of the train_vqvae stage, seconds per step of each log window)."""
    from mlflow.tracking import MlflowClient

    from pipelines.config import parse_config
    from pipelines.runner import run_stages

    cfg = parse_config(
        {
            "output_dir": os.path.join(workdir, "out"),
            "data": {"source": corpus, "image_size": args.size},
            "ray": {"num_cpus": args.num_cpus},
            "train_vqvae": {
                "model": MODEL,
                "steps": args.stage_steps,
                "batch_size": args.batch,
                "log_every": args.log_every,
                "eval_every": args.stage_steps,
                "checkpoint_every": args.stage_steps,
                "holdout_batches": 1,
            },
        }
    )
    manifest = run_stages(cfg, stages=["train_vqvae"])["train_vqvae"].manifest
    client = MlflowClient(f"sqlite:///{cfg.output_dir}/mlflow.db")
    history = client.get_metric_history(manifest.mlflow_run_id, "seconds_per_step")
    windows = [m.value for m in sorted(history, key=lambda m: m.step)]
    steady = windows[1:] or windows  # the first window holds the warm-up steps
    return args.batch / float(np.median(steady)), windows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed baseline steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--stage-steps", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    # Ray runs its workers at niceness 15; the baseline runs at the same, so that on a shared
    # machine both loops compete alike with whatever else runs.
    os.nice(max(0, RAY_WORKER_NICENESS - os.nice(0)))

    import ray

    from pipelines.config import DataSection
    from pipelines.data.corpus import open_corpus
    from pipelines.data.demo_data import generate_corpus

    with tempfile.TemporaryDirectory() as workdir:
        corpus = os.path.join(workdir, "corpus")
        classes = ("circle", "square", "triangle", "cross")
        generate_corpus(
            corpus, classes=classes, images_per_class=args.images // 4, image_size=args.size
        )
        load_before = os.getloadavg()[0]
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        data = DataSection(source=corpus, image_size=args.size)
        rows = open_corpus(data).dataset("all").take_all()
        images = np.stack([r["image"] for r in rows])
        print(
            f"{len(images)} images {args.size}x{args.size}, batch {args.batch}, "
            f"{torch.get_num_threads()} torch threads in the baseline, {args.num_cpus} Ray CPUs; "
            f"load average {load_before:.1f}"
        )
        before = baseline(images, args.batch, args.steps, args.warmup)
        print(f"baseline (plain loop)     {before:8.1f} img/s")
        rate, windows = stage(workdir, corpus, args)
        print(
            f"train_vqvae stage         {rate:8.1f} img/s  "
            f"(s/step per window: {', '.join(f'{w:.3f}' for w in windows)})"
        )
        after = baseline(images, args.batch, args.steps, args.warmup)
        print(f"baseline again            {after:8.1f} img/s")
        ray.shutdown()
    reference = (before + after) / 2
    ratio = rate / reference
    print(
        f"stage / baseline: {ratio:.2f}x (target >= {TARGET}); load average now "
        f"{os.getloadavg()[0]:.1f}"
    )
    raise SystemExit(0 if ratio >= TARGET else 1)


if __name__ == "__main__":
    main()
