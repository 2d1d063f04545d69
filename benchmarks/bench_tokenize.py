"""Benchmark the tokenize stage: Ray overhead, memory flatness and shard size.

In one run on one machine:

1. throughput of the tokenize stage (Ray Data read + decode tasks, an encoder actor, shard writer
   tasks) against a plain single-process ``model.encode`` loop over the same images, already
   decoded in memory, with the same model, batch size and thread count. The stage's steady state
   is its marginal rate between the N and 10N runs, (10N - N) / (t_10N - t_N), so the fixed costs
   (starting the actor, loading the model, the last shard's flush) cancel; whole-run rates are
   shown too.
2. peak resident memory of the driver and every Ray process (sampled with psutil) when tokenizing
   N and 10N images: a streaming stage should need about the same at both sizes.
3. bytes per image in the code shards against storing every code as int64 (8 bytes per code).

    python -m benchmarks.bench_tokenize --images 2000 --scale 10

The 10N corpus repeats the N generated images under new names (copying is much faster than
drawing), which changes nothing for the stage: each file is read, decoded and encoded anew.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import threading
import time

import numpy as np
import psutil
import torch

from pipelines.config import TokenizeSection, parse_config
from pipelines.data import storage
from pipelines.data.corpus import open_corpus
from pipelines.data.demo_data import generate_corpus
from pipelines.data.images import decode_image, to_model_input
from pipelines.data.shards import iter_code_samples, shard_bytes
from pipelines.manifest import write_manifest
from pipelines.stage import StageContext, ensure_ray
from pipelines.stage_manifests import TrainVQVAEManifest
from pipelines.stages import tokenize
from pipelines.tracking import TrackingContext
from vq_core.checkpoint import save_checkpoint
from vq_core.vqvae import VQVAE2, VQVAE2Config

# The demo configuration's autoencoder (configs/demo.yaml) with the paper's codebook size, so the
# bottom codes need uint16 as in a real run.
MODEL = {
    "channels": 64,
    "res_blocks": 2,
    "res_channels": 32,
    "embed_dim": 32,
    "codebook_size_top": 512,
    "codebook_size_bottom": 512,
}


ROLES = ("encoder actor", "other Ray workers", "driver", "Ray services")


def _role(proc: psutil.Process, driver_pid: int) -> str:
    if proc.pid == driver_pid:
        return "driver"
    title = " ".join(proc.cmdline())
    if "CodeEncoder" in title:
        return "encoder actor"  # decode (fused into the actor by Ray) + encode
    if title.startswith("ray::"):
        return "other Ray workers"  # read tasks, shard writers, idle pool
    return "Ray services"  # GCS, raylet, agents, monitors


class ProcessMonitor:
    """Samples this process and all its descendants (Ray's included): peak RSS and CPU time.

    CPU seconds are robust where wall time is not: on a shared machine other jobs slow a run
    down, but they do not add to the CPU time its own processes consume. CPU is attributed to
    roles by process title, so the encoder actor's share can be set against the plain loop.
    """

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.peak_total = 0
        self.peak_single = 0
        self.peak_processes = 0
        self._driver = os.getpid()
        self._cpu_start: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._roles: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _processes() -> list[psutil.Process]:
        me = psutil.Process()
        return [me, *me.children(recursive=True)]

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._measure()
            self._stop.wait(self.interval)
        self._measure()

    def _measure(self) -> None:
        total, single = 0, 0
        procs = self._processes()
        for proc in procs:
            try:
                with proc.oneshot():
                    rss = proc.memory_info().rss
                    cpu = sum(proc.cpu_times()[:2])
                    if self._roles.get(proc.pid) != "encoder actor":
                        self._roles[proc.pid] = _role(proc, self._driver)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += rss
            single = max(single, rss)
            self._cpu_last[proc.pid] = cpu
        if total > self.peak_total:
            self.peak_total, self.peak_processes = total, len(procs)
        self.peak_single = max(self.peak_single, single)

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds spent during the run, per role."""
        out = dict.fromkeys(ROLES, 0.0)
        for pid, last in self._cpu_last.items():
            out[self._roles[pid]] += last - self._cpu_start.get(pid, 0.0)
        return out

    def __enter__(self) -> ProcessMonitor:
        for proc in self._processes():
            try:
                self._cpu_start[proc.pid] = sum(proc.cpu_times()[:2])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def replicate_corpus(source: str, target: str, copies: int) -> int:
    """Copy every image of ``source`` ``copies`` times under new names into ``target``."""
    count = 0
    for name in sorted(os.listdir(source)):
        folder = os.path.join(source, name)
        if name.startswith(".") or not os.path.isdir(folder):
            continue
        os.makedirs(os.path.join(target, name), exist_ok=True)
        for file in sorted(os.listdir(folder)):
            stem, ext = os.path.splitext(file)
            for c in range(copies):
                shutil.copyfile(
                    os.path.join(folder, file), os.path.join(target, name, f"{stem}-{c:03d}{ext}")
                )
                count += 1
    return count


def make_config(workdir: str, corpus: str, args: argparse.Namespace, shard_max: int):
    raw = {
        "output_dir": os.path.join(workdir, "out-" + os.path.basename(corpus)),
        "data": {
            "source": corpus,
            "image_size": args.image_size,
            "validation_fraction": 0.05,
            "test_fraction": 0.05,
        },
        "ray": {"num_cpus": args.num_cpus},
        "train_vqvae": {"kind": "vqvae2", "model": MODEL},
        "tokenize": {
            "batch_size": args.batch_size,
            "num_actors": 1,
            "cpus_per_actor": args.cpus_per_actor,
            "shard_max_samples": shard_max,
        },
    }
    return parse_config(raw)


def install_autoencoder(cfg, model: VQVAE2, class_names: list[str]) -> None:
    """Write the checkpoint and a complete train_vqvae manifest, as stage 1 would."""
    vq_dir = TrainVQVAEManifest.directory(cfg.output_dir)
    storage.makedirs(vq_dir)
    checkpoint = storage.join(vq_dir, "model.pt")
    save_checkpoint(model, checkpoint)
    manifest = TrainVQVAEManifest.for_model(
        model,
        checkpoint=checkpoint,
        kind="vqvae2",
        image_size=cfg.data.size_hw,
        channels=cfg.data.channels,
        class_names=class_names,
    )
    write_manifest(cfg.output_dir, manifest)


def run_stage(cfg, model: VQVAE2) -> dict:
    """One tokenize run: manifest, wall time and peak memory."""
    install_autoencoder(cfg, model, open_corpus(cfg.data).class_names)
    spec = tokenize.SPEC
    stage_dir = spec.manifest.directory(cfg.output_dir)
    ctx = StageContext(cfg, spec.name, stage_dir, "benchmark", TrackingContext("", None))
    with ProcessMonitor() as memory:
        start = time.perf_counter()
        manifest = spec.run(ctx)
        wall = time.perf_counter() - start
    return {
        "manifest": manifest,
        "wall": wall,
        "run_ips": manifest.samples / wall,
        "peak_total": memory.peak_total,
        "peak_single": memory.peak_single,
        "peak_processes": memory.peak_processes,
        "cpu_per_image": {
            role: seconds / manifest.samples for role, seconds in memory.cpu_seconds().items()
        },
    }


def int64_shard_bytes(manifest: tokenize.TokenizeManifest) -> float:
    """Bytes per image of the first shard rewritten with 8-byte codes, same container."""
    samples = list(iter_code_samples([manifest.shards[0].uri]))
    levels = manifest.levels
    data = shard_bytes(
        [s["key"] for s in samples],
        [s["label"] for s in samples],
        {lvl: np.stack([s[lvl] for s in samples]).astype(np.uint64) for lvl in levels},
    )
    return len(data) / len(samples)


def decode_corpus(corpus: str, cfg) -> np.ndarray:
    """Every PNG of a folder corpus decoded as the stage decodes it: uint8 N x H x W x C."""
    images = []
    for root, _, files in os.walk(corpus):
        for file in sorted(files):
            if file.endswith(".png"):
                with open(os.path.join(root, file), "rb") as f:
                    images.append(decode_image(f.read(), cfg.data.size_hw, cfg.data.channels))
    return np.stack(images)


def run_baseline(
    images: np.ndarray, model: VQVAE2, batch: int, threads: int
) -> tuple[float, float]:
    """(images/s, CPU seconds per image) of a plain single-process inference loop."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    model.encode(to_model_input(images[:batch]))  # warm-up: allocator, kernels
    start, start_cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            codes = model.encode(to_model_input(images[i : i + batch]))
            _ = [c.numpy().astype(np.uint16) for c in codes]
    elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    torch.set_num_threads(previous)
    return len(images) / elapsed, cpu / len(images)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="N, generated images")
    parser.add_argument("--scale", type=int, default=10, help="the memory run uses scale x N")
    parser.add_argument("--image-size", type=int, default=64)
    stage_defaults = TokenizeSection()  # the stage as a config leaves it
    parser.add_argument("--batch-size", type=int, default=stage_defaults.batch_size)
    parser.add_argument("--cpus-per-actor", type=float, default=stage_defaults.cpus_per_actor)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--workdir", default=None, help="default: a temporary folder, removed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-tokenize-")
    try:
        classes = ("circle", "square", "triangle", "cross")
        small = os.path.join(workdir, "corpus-n")
        generate_corpus(
            small,
            classes=classes,
            images_per_class=max(1, args.images // len(classes)),
            image_size=args.image_size,
        )
        large = os.path.join(workdir, "corpus-10n")
        if not os.path.isdir(large):
            replicate_corpus(small, large, args.scale)
        warm = os.path.join(workdir, "corpus-warm")
        generate_corpus(warm, classes=classes, images_per_class=16, image_size=args.image_size)

        torch.manual_seed(0)
        model = VQVAE2(VQVAE2Config(**MODEL)).eval()
        n = args.images
        cfg_small = make_config(workdir, small, args, shard_max=max(1, n // 10))
        cfg_large = make_config(workdir, large, args, shard_max=max(1, n // 10))
        cfg_warm = make_config(workdir, warm, args, shard_max=32)
        ensure_ray(cfg_small)
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False

        threads = max(1, int(args.cpus_per_actor))
        load_before = os.getloadavg()[0]
        images = decode_corpus(small, cfg_small)
        # The plain loop runs before and after the stage runs, and the two are averaged, so a
        # change in the machine's load during the benchmark affects both sides alike.
        before = run_baseline(images, model, args.batch_size, threads)
        run_stage(cfg_warm, model)  # starts Ray's workers; not reported
        stage_n = run_stage(cfg_small, model)
        stage_10n = run_stage(cfg_large, model)
        after = run_baseline(images, model, args.batch_size, threads)
        load_after = os.getloadavg()[0]
        baseline = (before[0] + after[0]) / 2
        baseline_cpu = (before[1] + after[1]) / 2
        int64_shard = int64_shard_bytes(stage_n["manifest"])
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print_report(args, threads, stage_n, stage_10n, baseline, baseline_cpu, int64_shard)
    print(
        f"machine load (1 min) {load_before:.1f} before, {load_after:.1f} after, on "
        f"{os.cpu_count()} cores"
    )


def print_report(args, threads, small, large, baseline, baseline_cpu, int64_shard) -> None:
    """Three columns: the N run, the 10N run, and the marginal (steady) figure or a ratio."""
    mib = 1024**2
    m = small["manifest"]
    n_small, n_large = m.samples, large["manifest"].samples
    # The marginal cost between the two runs is the steady state: starting the actor, loading the
    # model and the last shard's flush cost the same in both and cancel out.
    extra = n_large - n_small
    steady = extra / (large["wall"] - small["wall"])

    def marginal_cpu(role: str) -> float:
        return (
            large["cpu_per_image"][role] * n_large - small["cpu_per_image"][role] * n_small
        ) / extra

    def ms(x: float) -> str:
        return f"{1000 * x:.2f}"

    steady_cpu = {role: marginal_cpu(role) for role in ROLES}
    codes = sum(h * w for h, w in m.code_shapes.values())
    raw_codes = sum(
        h * w * np.dtype(m.code_dtypes[lvl]).itemsize for lvl, (h, w) in m.code_shapes.items()
    )
    rows = [
        ("images", f"{n_small}", f"{n_large}", ""),
        ("stage wall time (s)", f"{small['wall']:.1f}", f"{large['wall']:.1f}", ""),
        ("stage images/s", f"{small['run_ips']:.0f}", f"{large['run_ips']:.0f}", f"{steady:.0f}"),
        (f"plain loop images/s ({threads} thread)", "", "", f"{baseline:.0f}"),
        ("throughput overhead: plain / stage", "", "", f"{baseline / steady:.2f}x"),
        *[
            (
                f"CPU ms/image, {role}",
                ms(small["cpu_per_image"][role]),
                ms(large["cpu_per_image"][role]),
                ms(steady_cpu[role]),
            )
            for role in ROLES
        ],
        (
            "CPU ms/image, stage total",
            ms(sum(small["cpu_per_image"].values())),
            ms(sum(large["cpu_per_image"].values())),
            ms(sum(steady_cpu.values())),
        ),
        (f"CPU ms/image, plain loop ({threads} thread)", "", "", ms(baseline_cpu)),
        (
            "CPU overhead: encoder actor / plain",
            "",
            "",
            f"{steady_cpu['encoder actor'] / baseline_cpu:.2f}x",
        ),
        (
            "peak RSS, all processes (MiB)",
            f"{small['peak_total'] / mib:.0f}",
            f"{large['peak_total'] / mib:.0f}",
            f"{large['peak_total'] / small['peak_total']:.2f}x",
        ),
        ("processes at the peak", f"{small['peak_processes']}", f"{large['peak_processes']}", ""),
        (
            "peak RSS, largest process (MiB)",
            f"{small['peak_single'] / mib:.0f}",
            f"{large['peak_single'] / mib:.0f}",
            f"{large['peak_single'] / small['peak_single']:.2f}x",
        ),
        ("code bytes/image, stored dtypes", f"{raw_codes}", "", ""),
        ("code bytes/image, int64", f"{8 * codes}", "", f"{8 * codes / raw_codes:.1f}x"),
        (
            "shard bytes/image (tar + npy headers)",
            f"{m['metrics']['bytes_per_image']:.0f}",
            f"{large['manifest'].metrics['bytes_per_image']:.0f}",
            "",
        ),
        (
            "shard bytes/image with int64 codes",
            f"{int64_shard:.0f}",
            "",
            f"{int64_shard / m['metrics']['bytes_per_image']:.1f}x",
        ),
    ]
    print(
        f"\ntokenize benchmark: {args.image_size}x{args.image_size} images, VQ-VAE-2 "
        f"(channels {MODEL['channels']}, K {MODEL['codebook_size_top']}), batch {args.batch_size}, "
        f"{args.cpus_per_actor:g} CPU per actor, {args.num_cpus} CPUs for Ray"
    )
    width = max(len(r[0]) for r in rows)
    header = ("N", f"{args.scale}N", "steady/ratio")
    print(f"{'':{width}}  {header[0]:>8}  {header[1]:>8}  {header[2]:>13}")
    for name, a, b, c in rows:
        print(f"{name:{width}}  {a:>8}  {b:>8}  {c:>13}")


if __name__ == "__main__":
    main()
