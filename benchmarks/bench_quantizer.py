"""Speed and memory of one training step of the vector quantizer.

Forward + backward of an EMA quantizer in training mode on a 16 x 64 x 64 x 64 map (65,536
vectors of D=64), at K=512 and K=8192, for
  (a) vq_core.quantizer.VectorQuantizer,
  (b) vector_quantize_pytorch.VectorQuantize with EMA (optional dependency, skipped if missing),
  (c) one bare N x D by D x K torch.mm: the floor of any exact nearest-code search.

Prints one table: median time per call, vectors per second, our throughput over the library's
(target >= 3x), our time over the bare matmul's (target <= 2x), and the peak extra memory of a
call (sampled process RSS growth on CPU, torch's peak allocation on CUDA) next to the search
block size that the quantizer allocates by construction.

    python benchmarks/bench_quantizer.py                # CPU, both sizes
    python benchmarks/bench_quantizer.py --device cuda  # GPU
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import threading
import time
from collections.abc import Callable

import torch

from vq_core.quantizer import VectorQuantizer

MIB = 2**20


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    steps: dict[str, Callable[[], None]], device: torch.device, warmup: int, repeats: int
) -> dict[str, tuple[float, float]]:
    """Median wall-clock and process CPU seconds per call of each step.

    The steps take turns, one call each per round, so that a change in the machine's load
    during the run hits all of them alike. CPU time (all threads) is the steadier figure on a
    machine shared with other jobs: it leaves out the time spent waiting for a core.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    _synchronize(device)
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            _synchronize(device)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in steps}


def _release_free_heap() -> None:
    # Memory freed by an earlier call stays resident in the C allocator's free lists and would
    # hide the next call's growth; hand it back to the OS first (glibc only).
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_extra_bytes(step: Callable[[], None], device: torch.device) -> int | None:
    """Peak memory one call adds on top of what was held before it (None if unmeasurable)."""
    if device.type == "cuda":
        _synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    _release_free_heap()
    try:
        base = _rss_bytes()
    except ImportError:
        return None
    # torch's CPU allocations are invisible to tracemalloc, so sample the resident set size
    # from a thread while the call runs (torch releases the GIL inside its kernels).
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    step()
    done.set()
    sampler.join()
    return max(peak, _rss_bytes()) - base


def our_step(num_codes: int, z: torch.Tensor, chunk_size: int | None) -> tuple[Callable, int]:
    quantizer = VectorQuantizer(
        num_codes, z.shape[1], update="ema", decay=0.99, chunk_size=chunk_size
    )
    quantizer = quantizer.to(z.device).train()
    grad = torch.randn_like(z)

    def step() -> None:
        z.grad = None
        out = quantizer(z)
        ((out.quantized * grad).sum() + out.loss).backward()

    num_vectors = z.numel() // z.shape[1]
    return step, quantizer.search_block_bytes(num_vectors)


def library_step(num_codes: int, z: torch.Tensor) -> Callable | None:
    try:
        from vector_quantize_pytorch import VectorQuantize
    except ImportError:
        return None
    # Same method as ours: EMA codebook, decay 0.99, commitment weight 0.25, plain
    # straight-through gradients, channels-first input.
    quantizer = VectorQuantize(
        dim=z.shape[1],
        codebook_size=num_codes,
        decay=0.99,
        commitment_weight=0.25,
        accept_image_fmap=True,
        rotation_trick=False,
    )
    quantizer = quantizer.to(z.device).train()
    grad = torch.randn_like(z)

    def step() -> None:
        z.grad = None
        quantized, _, loss = quantizer(z)
        ((quantized * grad).sum() + loss.sum()).backward()

    return step


def matmul_step(num_codes: int, z: torch.Tensor) -> Callable:
    flat = torch.randn(z.shape[0] * z.shape[2] * z.shape[3], z.shape[1], device=z.device)
    codebook_t = torch.randn(z.shape[1], num_codes, device=z.device)

    def step() -> None:
        torch.mm(flat, codebook_t)

    return step


def _fmt_mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.0f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--codes", type=int, nargs="+", default=[512, 8192], help="values of K")
    parser.add_argument("--batch", type=int, default=16, help="maps per batch")
    parser.add_argument("--side", type=int, default=64, help="map height and width")
    parser.add_argument("--dim", type=int, default=64, help="code dimension D")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="search rows per block (default: automatic)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--skip-library", action="store_true", help="do not run (b)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="time the ratios and throughput use (cpu: process CPU time, for busy machines)",
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    num_vectors = args.batch * args.side * args.side
    print(
        f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} "
        f"N={num_vectors} D={args.dim} repeats={args.repeats} (median)"
    )

    header = (
        f"{'K':>6} {'impl':<10} {'ms/call':>9} {'cpu ms':>9} {'Mvec/s':>8} {'ours/lib':>9} "
        f"{'ours/mm':>8} {'peak MiB':>9} {'block MiB':>9}"
    )
    print(header)
    print("-" * len(header))
    for num_codes in args.codes:
        z = torch.randn(args.batch, args.dim, args.side, args.side, device=device)
        z.requires_grad_(True)
        ours, block_bytes = our_step(num_codes, z, args.chunk_size)
        steps: dict[str, Callable | None] = {
            "ours": ours,
            "library": None if args.skip_library else library_step(num_codes, z),
            "torch.mm": matmul_step(num_codes, z),
        }
        seconds: dict[str, float] = {}
        wall: dict[str, float] = {}
        cpu: dict[str, float] = {}
        peaks: dict[str, int | None] = {}
        runnable = {name: step for name, step in steps.items() if step is not None}
        timings = median_seconds(runnable, device, args.warmup, args.repeats)
        for name, step in runnable.items():
            wall[name], cpu[name] = timings[name]
            seconds[name] = wall[name] if args.clock == "wall" else cpu[name]
            peaks[name] = peak_extra_bytes(step, device)

        for name in steps:
            if name not in seconds:
                print(f"{num_codes:>6} {name:<10} {'skipped':>9}")
                continue
            ratio_lib = ratio_mm = ""
            if name == "ours":
                if "library" in seconds:
                    ratio_lib = f"{seconds['library'] / seconds['ours']:.2f}x"
                ratio_mm = f"{seconds['ours'] / seconds['torch.mm']:.2f}x"
            block = _fmt_mib(block_bytes) if name == "ours" else ""
            print(
                f"{num_codes:>6} {name:<10} {wall[name] * 1e3:>9.1f} {cpu[name] * 1e3:>9.1f} "
                f"{num_vectors / seconds[name] / 1e6:>8.2f} {ratio_lib:>9} {ratio_mm:>8} "
                f"{_fmt_mib(peaks[name]):>9} {block:>9}"
            )
    print(
        f"Mvec/s and ratios use {args.clock} time. ours/lib: library time over ours "
        "(throughput ratio, target >= 3x); ours/mm: our time over one bare matmul (target <= 2x)."
    )


if __name__ == "__main__":
    main()
