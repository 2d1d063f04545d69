"""Benchmark tokenize at corpus scale: throughput, flat memory, manifest size, crash recovery.

Tokenizes generated folder corpora of 32x32 images through the real stage (Ray Data readers, the
encoder actor, shard writers) with a tiny untrained VQ-VAE-2, at each of ``--sizes``, and reports:

1. images per second (the stage's streaming part, and the whole run);
2. peak resident memory summed over the driver and every Ray process, and the largest single
   process: a streaming stage needs about the same at every size;
3. the driver's own peak RSS above what it held before the run: it should grow with the number of
   shards, not of images (its remaining O(images) part is the file listing, which Ray's own file
   readers hold in the driver too);
4. the size of the tokenize manifest (it lists shards, never keys);
5. recovery: the stage runs in a child process that is SIGKILLed when about half of its shards
   exist; a second child finishes the job. Reported: its wall time against an uninterrupted child
   run of the same corpus, and that every image ended up in exactly one shard.

    python -m benchmarks.bench_tokenize_scale                        # 20k, 100k, 200k; kill at 200k
    python -m benchmarks.bench_tokenize_scale --sizes 2000,4000 --kill-size 4000   # a quick run

Corpora are made from ``--unique`` demo images hard-linked under new names (linking is much
faster than drawing and changes nothing for the stage: each file is read, decoded and encoded).

One run on a shared 2-core machine (load average 40-85 throughout, so rates are pessimistic),
``--num-cpus 2``, sizes in the order 20k, 200k, 100k in one driver:

    images  shards  img/s stream  peak all MiB  max proc MiB  driver +MiB  manifest KiB  load1
     20000      20           343          4466           670         46.1           7.3   50.1
    200000     200           318          5077           679        118.6          61.5   58.5
    100000     104           204          5061           664         39.1          32.6   41.0

Killed at 20 of ~40 shards of a 40k corpus after 214 s, the second run kept 19,520 samples,
encoded the other 20,480 and finished in 192 s (an uninterrupted run: 285 s); every image was in
exactly one shard. The driver's growth is its O(files) listing (paths in key-hash order, and Ray's
own path list for the read tasks); the finished-key set never enters it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
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
from pipelines.data.shards import list_shards, read_key_index
from pipelines.manifest import write_manifest
from pipelines.stage import StageContext, ensure_ray
from pipelines.stage_manifests import TrainVQVAEManifest
from pipelines.stages import tokenize
from pipelines.tracking import TrackingContext
from vq_core.checkpoint import save_checkpoint
from vq_core.vqvae import VQVAE2, VQVAE2Config

CLASSES = ("circle", "square", "triangle", "cross")
# A tiny VQ-VAE-2; 512 codes per level so the codes are stored as uint16, as in a real run.
MODEL = VQVAE2Config(
    channels=32,
    res_blocks=1,
    res_channels=16,
    embed_dim=16,
    codebook_size_top=512,
    codebook_size_bottom=512,
)
MiB = 1024**2


class Monitor:
    """Samples the driver and all its descendants (Ray's processes): peak total RSS, largest
    single process, and the driver's own peak RSS."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.me = psutil.Process()
        self.driver_before = self.me.memory_info().rss
        self.peak_total = self.peak_single = self.peak_driver = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total, single = 0, 0
            for proc in [self.me, *self.me.children(recursive=True)]:
                try:
                    rss = proc.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                total += rss
                if proc.pid == self.me.pid:
                    self.peak_driver = max(self.peak_driver, rss)
                else:
                    single = max(single, rss)
            self.peak_total = max(self.peak_total, total)
            self.peak_single = max(self.peak_single, single)
            self._stop.wait(self.interval)

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def make_corpus(unique: str, target: str, size: int) -> None:
    """``size`` images under ``target/<class>/``, hard links to the ``unique`` images."""
    sources = [
        (cls, os.path.join(unique, cls, name))
        for cls in CLASSES
        for name in sorted(os.listdir(os.path.join(unique, cls)))
    ]
    for cls in CLASSES:
        os.makedirs(os.path.join(target, cls), exist_ok=True)
    for i in range(size):
        cls, path = sources[i % len(sources)]
        link = os.path.join(target, cls, f"{i:07d}.png")
        if not os.path.exists(link):
            os.link(path, link)


def make_config(workdir: str, corpus: str, args: argparse.Namespace):
    return parse_config(
        {
            "output_dir": os.path.join(workdir, "out-" + os.path.basename(corpus)),
            "data": {
                "source": corpus,
                "image_size": 32,
                "validation_fraction": 0.05,
                "test_fraction": 0.05,
            },
            "ray": {"num_cpus": args.num_cpus},
            "tokenize": {
                "batch_size": args.batch_size,
                "num_actors": 1,
                "cpus_per_actor": args.cpus_per_actor,
                "shard_max_samples": args.shard_max,
            },
        }
    )


def make_model(unique: str) -> VQVAE2:
    """An untrained model whose codebooks were initialised from data, so codes vary."""
    torch.manual_seed(0)
    model = VQVAE2(MODEL)
    images = []
    for cls in CLASSES:
        folder = os.path.join(unique, cls)
        for name in sorted(os.listdir(folder))[:64]:
            with open(os.path.join(folder, name), "rb") as f:
                images.append(decode_image(f.read(), (32, 32), 3))
    model.train()
    with torch.no_grad():
        model(to_model_input(np.stack(images)))
    return model.eval()


def install_autoencoder(cfg, model: VQVAE2) -> None:
    vq_dir = TrainVQVAEManifest.directory(cfg.output_dir)
    storage.makedirs(vq_dir)
    checkpoint = storage.join(vq_dir, "model.pt")
    save_checkpoint(model, checkpoint)
    write_manifest(
        cfg.output_dir,
        TrainVQVAEManifest.for_model(
            model,
            checkpoint=checkpoint,
            kind="vqvae2",
            image_size=cfg.data.size_hw,
            channels=cfg.data.channels,
            class_names=open_corpus(cfg.data).class_names,
        ),
    )


def run_stage(cfg) -> tokenize.TokenizeManifest:
    """The tokenize stage as the runner calls it, and its manifest written beside the shards."""
    ensure_ray(cfg)
    stage_dir = tokenize.TokenizeManifest.directory(cfg.output_dir)
    ctx = StageContext(cfg, "tokenize", stage_dir, "benchmark", TrackingContext("", None))
    return write_manifest(cfg.output_dir, tokenize.run(ctx))


def measure(cfg) -> dict:
    with Monitor() as monitor:
        start = time.perf_counter()
        manifest = run_stage(cfg)
        wall = time.perf_counter() - start
    manifest_bytes = len(storage.read_bytes(tokenize.TokenizeManifest.uri(cfg.output_dir)))
    return {
        "samples": manifest.samples,
        "shards": len(manifest.shards),
        "stream_ips": manifest.metrics["images_per_second"],
        "run_ips": manifest.samples / wall,
        "wall_s": wall,
        "peak_total_mib": monitor.peak_total / MiB,
        "peak_single_mib": monitor.peak_single / MiB,
        "driver_growth_mib": (monitor.peak_driver - monitor.driver_before) / MiB,
        "manifest_kib": manifest_bytes / 1024,
    }


def check_exactly_once(stage_dir: str, size: int) -> str:
    keys = [k for uri in list_shards(stage_dir) for k in read_key_index(uri, ["key"])["key"]]
    unique = len(set(keys))
    verdict = "ok" if len(keys) == unique == size else "WRONG"
    return f"{len(keys)} samples, {unique} distinct keys, corpus {size}: {verdict}"


def child_main(spec_path: str) -> None:
    """Run only the stage (the autoencoder is installed) and print its figures as one JSON line."""
    with open(spec_path) as f:
        spec = json.load(f)
    cfg = parse_config(spec)
    start = time.perf_counter()
    manifest = run_stage(cfg)
    print(
        "RESULT "
        + json.dumps(
            {
                "wall_s": time.perf_counter() - start,
                "samples": manifest.samples,
                "new": manifest.metrics["new_samples"],
                "resumed": manifest.metrics["resumed_samples"],
            }
        ),
        flush=True,
    )


def _child(spec_path: str, log_path: str) -> subprocess.Popen:
    log = open(log_path, "a")
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bench_tokenize_scale", "--child", spec_path],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the kill reaches its Ray processes
    )


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the child and every process it started, as a machine failure would."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    os.killpg(proc.pid, signal.SIGKILL)
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def _result(log_path: str) -> dict:
    with open(log_path) as f:
        lines = [line for line in f if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"the child run wrote no result; see {log_path}")
    return json.loads(lines[-1][len("RESULT ") :])


def kill_and_resume(workdir: str, corpus: str, model: VQVAE2, args) -> dict:
    cfg = make_config(workdir, corpus, args)
    spec_path = os.path.join(workdir, "child-config.json")
    out = {}
    for run in ("uninterrupted", "killed"):
        run_cfg = cfg.model_copy(update={"output_dir": cfg.output_dir + "-" + run})
        install_autoencoder(run_cfg, model)
        with open(spec_path, "w") as f:
            json.dump(run_cfg.model_dump(mode="json"), f)
        stage_dir = tokenize.TokenizeManifest.directory(run_cfg.output_dir)
        log_path = os.path.join(workdir, f"child-{run}.log")
        start = time.perf_counter()
        proc = _child(spec_path, log_path)
        if run == "uninterrupted":
            proc.wait()
            out["uninterrupted_s"] = _result(log_path)["wall_s"]
            out["uninterrupted_process_s"] = time.perf_counter() - start
            continue
        half = args.kill_size // args.shard_max // 2
        while proc.poll() is None and len(list_shards(stage_dir)) < half:
            time.sleep(0.2)
        shards_at_kill = len(list_shards(stage_dir))
        killed_after = time.perf_counter() - start
        _kill_tree(proc)
        start = time.perf_counter()
        proc = _child(spec_path, log_path)
        proc.wait()
        result = _result(log_path)
        out.update(
            shards_at_kill=shards_at_kill,
            killed_after_s=killed_after,
            resume_s=result["wall_s"],
            resume_process_s=time.perf_counter() - start,
            resumed_samples=result["resumed"],
            new_samples=result["new"],
            check=check_exactly_once(stage_dir, args.kill_size),
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default="20000,100000,200000", help="corpus sizes, comma-separated"
    )
    parser.add_argument("--kill-size", type=int, default=200000, help="0 skips the kill test")
    parser.add_argument("--unique", type=int, default=2000, help="distinct generated images")
    stage_defaults = TokenizeSection()  # the stage as a config leaves it
    parser.add_argument("--shard-max", type=int, default=stage_defaults.shard_max_samples)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--cpus-per-actor", type=float, default=stage_defaults.cpus_per_actor)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--workdir", default=None, help="default: a temporary folder")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.child:
        child_main(args.child)
        return

    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-tokenize-scale-")
    unique = os.path.join(workdir, "unique")
    generate_corpus(
        unique, classes=CLASSES, images_per_class=args.unique // len(CLASSES), image_size=32
    )
    model = make_model(unique)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    print(f"workdir {workdir}; load average before: {os.getloadavg()}", flush=True)

    rows = []
    for size in sizes:
        corpus = os.path.join(workdir, f"corpus-{size}")
        start = time.perf_counter()
        make_corpus(unique, corpus, size)
        made = time.perf_counter() - start
        cfg = make_config(workdir, corpus, args)
        install_autoencoder(cfg, model)
        row = {"size": size, "corpus_s": made, **measure(cfg), "load": os.getloadavg()[0]}
        rows.append(row)
        print(json.dumps(row), flush=True)

    print()
    print(
        f"{'images':>8} {'shards':>6} {'img/s stream':>12} {'img/s run':>9} {'peak all MiB':>12} "
        f"{'max proc MiB':>12} {'driver +MiB':>11} {'manifest KiB':>12} {'load1':>6}"
    )
    for r in rows:
        print(
            f"{r['samples']:>8} {r['shards']:>6} {r['stream_ips']:>12.0f} {r['run_ips']:>9.0f} "
            f"{r['peak_total_mib']:>12.0f} {r['peak_single_mib']:>12.0f} "
            f"{r['driver_growth_mib']:>11.1f} {r['manifest_kib']:>12.1f} {r['load']:>6.1f}"
        )

    if args.kill_size:
        import ray

        ray.shutdown()  # the children start their own Ray, as a re-submitted job would
        corpus = os.path.join(workdir, f"corpus-{args.kill_size}")
        make_corpus(unique, corpus, args.kill_size)
        result = kill_and_resume(workdir, corpus, model, args)
        print()
        print(f"kill at ~50% of {args.kill_size} images: {json.dumps(result)}")
        print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
