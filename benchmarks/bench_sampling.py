"""Cached versus naive sampling of the PixelSNAIL and transformer priors: same model, weights and
seed.

Cases:
  top-32      PixelSNAIL top prior at 32x32: attention, class-conditional (small widths, see flags)
  bottom-64   PixelSNAIL bottom prior at 64x64: no attention, conditioned on a 32x32 top map and
              the class
  demo-top    the demo's top prior, as configs/demo.yaml builds it
  demo-bottom the demo's bottom prior (conditioned on the top map), as configs/demo.yaml builds it
  transformer-top-32     transformer prior at 32x32, class-conditional (widths: the --tf-* flags)
  transformer-bottom-64  transformer prior at 64x64, conditioned on a 32x32 top map and the class
  demo-dalle  the transformer prior of configs/demo-dalle.yaml (8x8 dVAE codes)

Each case reports seconds per batch, samples/s, tokens/s (codes drawn per second) and the cached
sampler's speed-up over the naive one.

The naive sampler runs one full forward pass per position, so its cost per step is constant.
When a whole naive run would exceed --naive-budget-s (or --naive-max-steps), it is timed over
the first steps only and extrapolated to the whole map; the output says so. The naive steps
that do run are checked against the cached sample: with the same seed they must draw the same
codes.

    python benchmarks/bench_sampling.py                 # all cases on the CPU
    python benchmarks/bench_sampling.py --device cuda --batch 64
    python benchmarks/bench_sampling.py --cases top-32 --threads 1
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vq_core.pixelsnail import PixelSNAIL, PixelSNAILConfig
from vq_core.sampling import draw_categorical, filter_logits, sample_codes
from vq_core.transformer import TransformerPrior, TransformerPriorConfig

CASES = (
    "top-32",
    "bottom-64",
    "demo-top",
    "demo-bottom",
    "transformer-top-32",
    "transformer-bottom-64",
    "demo-dalle",
)
NUM_CLASSES = 4


@dataclass
class Timing:
    seconds: float  # for the whole map (extrapolated when steps < positions)
    steps: int  # positions actually run
    positions: int
    codes: torch.Tensor


def build_config(case: str, args: argparse.Namespace) -> PixelSNAILConfig | TransformerPriorConfig:
    small = dict(
        channels=args.channels,
        num_blocks=args.num_blocks,
        res_blocks=args.res_blocks,
        num_heads=args.num_heads,
        attention_channels=args.attention_channels,
        condition_channels=args.condition_channels,
        condition_res_blocks=1,
    )
    if case == "top-32":
        return PixelSNAILConfig(args.codes, 32, 32, num_classes=NUM_CLASSES, **small)
    if case == "bottom-64":
        return PixelSNAILConfig(
            args.codes, 64, 64, attention=False, num_classes=NUM_CLASSES,
            condition_num_codes=args.codes, condition_height=32, condition_width=32, **small,
        )  # fmt: skip
    if case in ("demo-top", "demo-bottom"):
        return demo_config(case)
    sizes = dict(
        channels=args.tf_channels,
        num_layers=args.tf_layers,
        num_heads=args.tf_heads,
        condition_channels=args.condition_channels,
        condition_res_blocks=1,
    )
    if case == "transformer-top-32":
        return TransformerPriorConfig(args.codes, 32, 32, num_classes=NUM_CLASSES, **sizes)
    if case == "transformer-bottom-64":
        return TransformerPriorConfig(
            args.codes, 64, 64, num_classes=NUM_CLASSES,
            condition_num_codes=args.codes, condition_height=32, condition_width=32, **sizes,
        )  # fmt: skip
    if case == "demo-dalle":
        return demo_dalle_config()
    raise ValueError(f"unknown case {case!r}; expected one of {CASES}")


def demo_config(case: str) -> PixelSNAILConfig:
    """The prior the demo pipeline trains, with the sizes configs/demo.yaml gives it."""
    from pipelines.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    height, width = cfg.data.size_hw
    model = cfg.train_vqvae.model
    classes = len(cfg.data.generate.classes)
    top = model["codebook_size_top"]
    if case == "demo-top":
        return PixelSNAILConfig(
            top, height // 8, width // 8, num_classes=classes, **cfg.train_prior.top.model
        )
    return PixelSNAILConfig(
        model["codebook_size_bottom"], height // 4, width // 4, num_classes=classes,
        condition_num_codes=top, condition_height=height // 8, condition_width=width // 8,
        **cfg.train_prior.bottom.model,
    )  # fmt: skip


def demo_dalle_config() -> TransformerPriorConfig:
    """The transformer prior of configs/demo-dalle.yaml, over its dVAE's codes."""
    from pipelines.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo-dalle.yaml")
    height, width = cfg.data.size_hw
    model = cfg.train_vqvae.model
    down = model["downsample"]
    return TransformerPriorConfig(
        model["codebook_size"], height // down, width // down,
        num_classes=len(cfg.data.generate.classes), **cfg.train_prior.codes.model,
    )  # fmt: skip


def describe(config: PixelSNAILConfig | TransformerPriorConfig) -> str:
    if isinstance(config, TransformerPriorConfig):
        return (
            f"transformer, channels={config.channels}, layers={config.num_layers}, "
            f"heads={config.num_heads}"
        )
    return (
        f"PixelSNAIL, channels={config.channels}, "
        f"blocks={config.num_blocks}x{config.res_blocks}, attention={config.attention}"
    )


def clock(args: argparse.Namespace):
    # Process CPU time is what a run would take on an otherwise idle machine (with --threads 1);
    # wall time is what it takes here and now.
    return time.process_time if args.clock == "cpu" else time.perf_counter


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def time_cached(prior, labels, condition, args, device) -> Timing:
    now = clock(args)
    synchronize(device)
    start = now()
    codes = sample_codes(
        prior, args.batch, labels, condition, generator=make_generator(device, args.seed)
    )
    synchronize(device)
    positions = codes.shape[1] * codes.shape[2]
    return Timing(now() - start, positions, positions, codes)


@torch.inference_mode()
def time_naive(prior, labels, condition, args, device) -> Timing:
    """The naive procedure of vq_core.sampling (a full forward pass, filter, draw per position),
    stopped after --naive-max-steps steps or --naive-budget-s seconds."""
    cfg = prior.config
    positions = cfg.height * cfg.width
    codes = torch.zeros(args.batch, cfg.height, cfg.width, dtype=torch.long, device=device)
    generator = make_generator(device, args.seed)
    now = clock(args)
    synchronize(device)
    start, wall_start = now(), time.perf_counter()
    steps = 0
    for p in range(min(positions, args.naive_max_steps)):
        row, col = divmod(p, cfg.width)
        logits = prior(codes, labels, condition)[:, :, row, col]
        codes[:, row, col] = draw_categorical(filter_logits(logits), generator)
        steps += 1
        if time.perf_counter() - wall_start > args.naive_budget_s:
            break
    synchronize(device)
    elapsed = now() - start
    return Timing(elapsed * positions / steps, steps, positions, codes)


def run_case(case: str, args: argparse.Namespace, device: torch.device) -> None:
    config = build_config(case, args)
    torch.manual_seed(args.seed)
    model = TransformerPrior if isinstance(config, TransformerPriorConfig) else PixelSNAIL
    prior = model(config).to(device).eval()
    g = torch.Generator().manual_seed(args.seed)
    labels = (torch.arange(args.batch) % NUM_CLASSES).to(device)
    condition = None
    if config.condition_num_codes:
        shape = (args.batch, config.condition_height, config.condition_width)
        condition = torch.randint(0, config.condition_num_codes, shape, generator=g).to(device)
    with torch.inference_mode():  # warm-up: allocator, kernels, lazy initialisation
        prior(torch.zeros(args.batch, config.height, config.width, dtype=torch.long, device=device),
              labels, condition)  # fmt: skip

    cached = time_cached(prior, labels, condition, args, device)
    naive = time_naive(prior, labels, condition, args, device)

    size = f"{config.height}x{config.width}"
    params = sum(p.numel() for p in prior.parameters()) / 1e6
    condition_size = "none"
    if config.condition_num_codes:
        condition_size = f"{config.condition_height}x{config.condition_width}"
    print(
        f"\n{case}: {size} codes, K={config.num_codes}, {describe(config)}, "
        f"condition={condition_size}, {params:.2f}M parameters, batch {args.batch}"
    )
    for name, timing in (("cached", cached), ("naive", naive)):
        note = ""
        if timing.steps < timing.positions:
            note = f"  (extrapolated from {timing.steps} of {timing.positions} steps)"
        rate = args.batch / timing.seconds
        per_step = timing.seconds / timing.positions * 1e3
        tokens = rate * timing.positions
        print(
            f"  {name:7s} {timing.seconds:9.2f} s  {rate:9.3f} samples/s  "
            f"{tokens:10.1f} tokens/s  {per_step:8.2f} ms/step{note}"
        )
    flat_cached, flat_naive = cached.codes.flatten(1), naive.codes.flatten(1)
    same = torch.equal(flat_cached[:, : naive.steps], flat_naive[:, : naive.steps])
    print(
        f"  speedup {naive.seconds / cached.seconds:.1f}x; codes identical over the "
        f"{naive.steps} naive steps: {'yes' if same else 'NO'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--batch", type=int, default=8, help="samples per run (default: 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU time, a steadier estimate of the "
        "idle-machine time on a shared machine (CPU only, best with --threads 1)",
    )
    parser.add_argument("--codes", type=int, default=512, help="K of top-32/bottom-64")
    small = parser.add_argument_group("widths of top-32 and bottom-64")
    small.add_argument("--channels", type=int, default=32)
    small.add_argument("--num-blocks", type=int, default=2)
    small.add_argument("--res-blocks", type=int, default=1)
    small.add_argument("--num-heads", type=int, default=2)
    small.add_argument("--attention-channels", type=int, default=32)
    small.add_argument("--condition-channels", type=int, default=32)
    tf = parser.add_argument_group("widths of transformer-top-32 and transformer-bottom-64")
    tf.add_argument("--tf-channels", type=int, default=64)
    tf.add_argument("--tf-layers", type=int, default=4)
    tf.add_argument("--tf-heads", type=int, default=4)
    naive = parser.add_argument_group("naive runs")
    naive.add_argument("--naive-max-steps", type=int, default=1024)
    naive.add_argument(
        "--naive-budget-s", type=float, default=30.0, help="wall-clock seconds per naive run"
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    if device.type == "cuda" and args.clock == "cpu":
        parser.error("--clock cpu measures CPU work only; use the wall clock with --device cuda")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device: {where}; torch {torch.__version__}; {torch.get_num_threads()} CPU threads; "
        f"{args.clock} clock; naive runs capped at {args.naive_max_steps} steps / {args.naive_budget_s:.0f} s"
    )
    for case in args.cases:
        run_case(case, args, device)


if __name__ == "__main__":
    main()
