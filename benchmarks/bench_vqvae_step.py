"""Throughput of one VQ-VAE-2 training step (forward + backward + Adam) at the reference sizes.

Reference sizes (model notes, section 2): channels 128, 2 residual blocks of 32 channels, D 64,
K 512 per level, 64x64 RGB images, batch 32. On CPU only float32 is measured. With --device cuda
the same run also measures bf16 autocast, channels_last, and both together, and prints each
beside the float32 baseline as a ratio, so the comparison never mixes machines or runs.

    python benchmarks/bench_vqvae_step.py                  # CPU, float32
    python benchmarks/bench_vqvae_step.py --device cuda    # GPU, all variants
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import dataclass

import torch

from vq_core.vqvae import VQVAE2, VQVAE2Config


@dataclass
class Variant:
    name: str
    bf16: bool
    channels_last: bool


VARIANTS = [
    Variant("float32", bf16=False, channels_last=False),
    Variant("bf16 autocast", bf16=True, channels_last=False),
    Variant("channels_last", bf16=False, channels_last=True),
    Variant("bf16 + channels_last", bf16=True, channels_last=True),
]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(variant: Variant, args: argparse.Namespace, device: torch.device) -> float:
    """Images per second of the training step in `variant`, after warm-up steps."""
    torch.manual_seed(0)
    config = VQVAE2Config(
        channels=args.channels,
        res_blocks=2,
        res_channels=32,
        embed_dim=64,
        codebook_size_top=args.codes,
        codebook_size_bottom=args.codes,
    )
    model = VQVAE2(config).to(device)
    memory_format = torch.channels_last if variant.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    x = torch.rand(args.batch, 3, args.size, args.size, device=device) * 2 - 1
    x = x.contiguous(memory_format=memory_format)

    def autocast():
        if variant.bf16:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step() -> None:
        with autocast():
            loss = model(x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    elapsed = time.perf_counter() - start
    return args.steps * args.batch / elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=64, help="image height and width")
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--codes", type=int, default=512, help="codebook size per level")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (cpu 10, cuda 50)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (cpu 2, cuda 10)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was requested but torch sees no CUDA device")
    on_gpu = device.type == "cuda"
    args.steps = args.steps if args.steps is not None else (50 if on_gpu else 10)
    args.warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 2)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if on_gpu:
        # Input shapes never change, so let cuDNN time its algorithms once per variant.
        torch.backends.cudnn.benchmark = True
        # PyTorch runs float32 convolutions in TF32 by default on recent GPUs: say so, since
        # it is part of what the "float32" baseline means.
        where = (
            f"{torch.cuda.get_device_name(device)}, cuDNN TF32 "
            f"{'on' if torch.backends.cudnn.allow_tf32 else 'off'}"
        )
    else:
        where = f"CPU, {torch.get_num_threads()} threads"
    print(
        f"VQ-VAE-2 training step: batch {args.batch}, {args.size}x{args.size} RGB, channels "
        f"{args.channels}, K {args.codes} per level, D 64 on {where} (torch {torch.__version__})"
    )
    variants = VARIANTS if on_gpu else VARIANTS[:1]
    baseline = None
    print(f"{'variant':<24}{'images/s':>12}{'vs float32':>12}")
    for variant in variants:
        rate = measure(variant, args, device)
        baseline = rate if baseline is None else baseline
        print(f"{variant.name:<24}{rate:>12.1f}{rate / baseline:>11.2f}x")


if __name__ == "__main__":
    main()
