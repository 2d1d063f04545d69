"""What each stage costs by image resolution: speed, memory per worker, bytes per image.

For each resolution (32, 64, 128, 256 px by default) and each set of model sizes (``cluster``:
``configs/cluster.yaml``'s autoencoder and priors; ``demo``: ``configs/demo.yaml``'s, for contrast;
``tiny3``: ``configs/demo-three-level.yaml``'s small models with ``configs/ffhq-1024.yaml``'s
three levels, downsample 2, 2 and 8, so 1024 px images give 32x32, 64x64 and 128x128 codes; or
the path of any config file, whose ``train_vqvae.model`` and ``train_prior.<level>`` sections
define the models), one fresh process per stage measures, on real photo crops (scikit-image's
photographs, JPEG q90):

- train_vqvae, and train_prior for each level of the autoencoder (``train_prior_top``,
  ``train_prior_bottom``; ``train_prior_middle`` too with three levels; ``--stages train_prior``
  is all of them): images per second of an optimizer step at ``--batch``;
  the bytes autograd saves per image (device independent); the peak-memory estimate per worker at
  the config's own batch and precision (``vq_core.memory``, the number a training stage logs and
  checks), with and without activation checkpointing;
- tokenize: images per second of ``encode``, and code-shard bytes per image (the real shard format);
- sample: seconds per image, every level top down with the cached sampler (each prior conditioned
  on the level above, ``vq_core.sampling.sample_levels``), then decode, for one image alone and
  per image in a batch of ``--sample-batch`` (0: one image only);
- the image cache: build seconds and bytes per image for both encodings, beside the JPEG bytes;
- every process: its peak resident memory; with ``--device cuda`` also
  ``torch.cuda.max_memory_allocated``.

Ratios are printed against a baseline measured in the same run: the 32 px row of the same model
sizes. A full run at the cluster sizes takes a while on a CPU (the 256 px bottom prior alone is
minutes); ``--sizes`` and ``--stages`` narrow it.

    python benchmarks/bench_resolution.py --sizes 32 64 128 256 --models cluster demo
    python benchmarks/bench_resolution.py --device cuda --precision bf16 --batch 16
    python benchmarks/bench_resolution.py --models tiny3 --sizes 1024 --batch 1 --steps 1 \
        --stages train_vqvae tokenize train_prior sample --sample-batch 2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# Each set of model sizes: a config file and overrides of it.
TINY3_LEVELS = (
    "[{name: top, downsample: 2, codebook_size: 32},"
    " {name: middle, downsample: 2, codebook_size: 32},"
    " {name: bottom, downsample: 8, codebook_size: 64}]"
)
CONFIGS = {
    "cluster": (ROOT / "configs" / "cluster.yaml", ()),
    "demo": (ROOT / "configs" / "demo.yaml", ()),
    "tiny3": (
        ROOT / "configs" / "demo-three-level.yaml",
        (f"train_vqvae.model.levels={TINY3_LEVELS}",),
    ),
}
# "train_prior" stands for train_prior_<level>, one stage per level of the autoencoder, top first.
STAGES = ("cache", "train_vqvae", "tokenize", "train_prior", "sample")
PRIOR_STAGE = "train_prior_"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")
CLASSES = 4
GIB = 2**30


# ------------------------------------------------------------------------------------- inputs


def photo_crops(size: int, count: int) -> list[np.ndarray]:
    """``count`` size x size RGB crops of scikit-image's photographs (resized up when a photograph
    is smaller than a crop), or of a smooth noise field when scikit-image is not installed."""
    from PIL import Image

    rng = np.random.default_rng(size)
    try:
        from skimage import data

        photos = [np.asarray(getattr(data, name)())[..., :3] for name in PHOTOS]
    except ImportError:
        field = rng.normal(0, 1, (64, 64, 3)).cumsum(0).cumsum(1)
        photos = [np.uint8(255 * (field - field.min()) / np.ptp(field))]
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        side = min(photo.shape[:2])
        window = int(rng.integers(max(side // 2, 8), side + 1))
        y = int(rng.integers(0, photo.shape[0] - window + 1))
        x = int(rng.integers(0, photo.shape[1] - window + 1))
        crop = Image.fromarray(np.ascontiguousarray(photo[y : y + window, x : x + window]))
        crops.append(np.asarray(crop.resize((size, size), Image.BICUBIC)))
    return crops


def jpeg_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def model_sizes(models: str) -> dict:
    """The autoencoder and per-level prior sections of a config file (``models``: a name in
    CONFIGS or a path), with the batches and precision, and the autoencoder's levels, top first
    (name, downsample relative to the level below, codebook size)."""
    from pipelines.config import load_config
    from vq_core.vqvae import VQVAE2Config

    path, overrides = CONFIGS.get(models, (Path(models), ()))
    cfg = load_config(path, ["output_dir=/tmp/unused", "data.source=/tmp/unused", *overrides])
    if cfg.train_vqvae.kind != "vqvae2":
        raise SystemExit(f"{models}: train_vqvae.kind must be vqvae2, got {cfg.train_vqvae.kind!r}")
    specs = VQVAE2Config(**cfg.train_vqvae.model).level_specs()
    levels = [spec.name for spec in specs]
    priors = {level: cfg.train_prior.for_level(level, levels) for level in levels}
    return {
        "levels": [(spec.name, spec.downsample, spec.codebook_size) for spec in specs],
        "autoencoder": dict(cfg.train_vqvae.model),
        "vqvae_batch": cfg.train_vqvae.batch_size,
        "vqvae_precision": cfg.train_vqvae.precision,
        "priors": {level: dict(p.model) for level, p in priors.items()},
        "prior_batch": {level: p.batch_size for level, p in priors.items()},
        "prior_precision": {level: p.precision for level, p in priors.items()},
        "prior_kind": {level: p.kind for level, p in priors.items()},
    }


# ------------------------------------------------------------------------------------- models


def autoencoder(sizes: dict):
    from vq_core.vqvae import VQVAE2, VQVAE2Config

    return VQVAE2(VQVAE2Config(**sizes["autoencoder"]))


def code_maps(sizes: dict, image_size: int) -> dict[str, tuple[int, tuple[int, int]]]:
    """Each level's (codebook size, code map shape) for image_size x image_size images, top
    first: a level's factor is its own downsample times those of the levels below it."""
    maps: dict[str, tuple[int, tuple[int, int]]] = {}
    factor = 1
    for name, downsample, codebook_size in reversed(sizes["levels"]):
        factor *= downsample
        maps[name] = (codebook_size, (image_size // factor,) * 2)
    return dict(reversed(maps.items()))


def prior(sizes: dict, level: str, image_size: int):
    """The prior of ``level``, conditioned on the class and on the level above it (if any)."""
    from vq_core.kinds import get_kind, prior_conditions, prior_fields

    maps = code_maps(sizes, image_size)
    condition = prior_conditions(list(maps))[level]
    num_codes, shape = maps[level]
    derived = prior_fields(num_codes, shape, CLASSES, maps[condition] if condition else None)
    kind = get_kind(sizes["prior_kind"][level])
    return kind.model_class(kind.config(sizes["priors"][level], derived))


def images_batch(size: int, n: int, device):

    from pipelines.data.images import to_model_input

    return to_model_input(np.stack(photo_crops(size, n))).to(device)


def prior_batch(model, n: int, device):
    import torch

    cfg = model.config
    g = torch.Generator().manual_seed(n)
    codes = torch.randint(0, cfg.num_codes, (n, cfg.height, cfg.width), generator=g)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    condition = None
    if cfg.condition_num_codes:
        shape = (n, cfg.condition_height, cfg.condition_width)
        condition = torch.randint(0, cfg.condition_num_codes, shape, generator=g)
    return tuple(None if t is None else t.to(device) for t in (codes, labels, condition))


# ------------------------------------------------------------------------------------- stages


def timed_steps(model, make_batch, loss_fn, batch: int, steps: int, precision: str, device):
    """Seconds per optimizer step at ``batch`` after one warm-up step."""
    import torch

    from vq_core.memory import autocast_for

    model = model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    inputs = make_batch(batch)
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        with autocast_for(device, precision):
            loss = loss_fn(model, inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def training_figures(model, make_batch, loss_fn, args, config_batch: int, precision: str) -> dict:
    import torch

    from vq_core.memory import autocast_for, estimate_training_memory, saved_tensor_bytes
    from vq_core.recompute import set_activation_checkpointing

    device = torch.device(args.device)
    model = model.to(device)
    saved = []
    for n in (1, 2):
        inputs = make_batch(n)

        def forward(inputs=inputs):
            with autocast_for(device, args.precision):
                loss_fn(model.train(), inputs)

        saved.append(saved_tensor_bytes(forward))
    step = timed_steps(model, make_batch, loss_fn, args.batch, args.steps, args.precision, device)
    out = {
        "images_per_second": args.batch / step,
        "saved_bytes_per_image": saved[1] - saved[0],
    }
    for recompute in (False, True):
        set_activation_checkpointing(model, recompute)
        estimate = estimate_training_memory(
            model, make_batch, loss_fn, batch_size=config_batch, precision=precision, device=device
        )
        key = "estimate_checkpointed" if recompute else "estimate"
        out[key] = estimate.peak_bytes
        out[key + "_per_image"] = estimate.per_sample_bytes
    out["estimate_batch"] = config_batch
    return out


def stage_train_vqvae(args, size: int, sizes: dict) -> dict:
    import torch

    device = torch.device(args.device)
    return training_figures(
        autoencoder(sizes),
        lambda n: images_batch(size, n, device),
        lambda m, x: m(x).loss,
        args,
        sizes["vqvae_batch"],
        sizes["vqvae_precision"],
    )


def stage_train_prior(args, size: int, sizes: dict, level: str) -> dict:
    import torch

    device = torch.device(args.device)
    model = prior(sizes, level, size)
    return training_figures(
        model,
        lambda n: prior_batch(model, n, device),
        lambda m, b: m.loss(*b),
        args,
        sizes["prior_batch"][level],
        sizes["prior_precision"][level],
    )


def stage_tokenize(args, size: int, sizes: dict) -> dict:
    import torch

    from pipelines.data.shards import shard_bytes

    device = torch.device(args.device)
    model = autoencoder(sizes).to(device).eval()
    x = images_batch(size, args.batch, device)
    model.encode(x)  # warm-up
    start = time.perf_counter()
    maps = model.encode(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    keys = [f"img{i:05d}" for i in range(args.batch)]
    codes = {level: c.cpu().numpy().astype(np.uint16) for level, c in zip(model.levels, maps)}
    shard = shard_bytes(keys, [0] * args.batch, codes)
    return {
        "images_per_second": args.batch / seconds,
        "shard_bytes_per_image": len(shard) / args.batch,
    }


def stage_sample(args, size: int, sizes: dict) -> dict:
    import torch

    from vq_core.kinds import prior_conditions
    from vq_core.sampling import sample_levels

    device = torch.device(args.device)
    decoder = autoencoder(sizes).to(device).eval()
    levels = [name for name, _, _ in sizes["levels"]]
    priors = [
        (level, condition, prior(sizes, level, size).to(device).eval())
        for level, condition in prior_conditions(levels).items()
    ]
    out = {}
    runs = [(1, "seconds_per_image_alone")]
    if args.sample_batch:
        runs.append((args.sample_batch, "seconds_per_image_batched"))
    for n, key in runs:
        labels = torch.arange(n, device=device) % CLASSES
        g = torch.Generator(device=device).manual_seed(0)
        start = time.perf_counter()
        with torch.no_grad():
            codes = sample_levels(priors, n, labels, generator=g)
            decoder.decode_codes(tuple(codes[level] for level in levels))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out[key] = (time.perf_counter() - start) / n
    return out


def stage_cache(args, size: int, sizes: dict) -> dict:
    import ray

    from pipelines.config import DataSection
    from pipelines.data.image_cache import ensure_image_cache

    count = args.cache_images
    crops = photo_crops(size, count)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        jpegs = 0
        for i, crop in enumerate(crops):
            folder = Path(tmp, "corpus", f"class{i % CLASSES}")
            folder.mkdir(parents=True, exist_ok=True)
            data = jpeg_bytes(crop)
            jpegs += len(data)
            (folder / f"img{i:05d}.jpg").write_bytes(data)
        out["jpeg_bytes_per_image"] = jpegs / count
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
        ray.data.range(2).take_all()  # Ray Data's start-up, out of the first build's time
        for encoding in ("pixels", "encoded"):
            cfg = DataSection(source=str(Path(tmp, "corpus")), image_size=size, cache=encoding)
            start = time.perf_counter()
            cache = ensure_image_cache(cfg, str(Path(tmp, "out")))
            out[f"{encoding}_build_seconds"] = time.perf_counter() - start
            parts = [f for f in os.listdir(cache.directory) if f.endswith(".parquet")]
            total = sum(os.path.getsize(os.path.join(cache.directory, f)) for f in parts)
            out[f"{encoding}_bytes_per_image"] = total / cache.rows
        ray.shutdown()
    return out


def peak_rss() -> int:
    """This process's peak resident bytes (VmHWM: unlike getrusage's maxrss, not inherited from
    the parent that started it)."""
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_worker(job: dict) -> dict:
    args = argparse.Namespace(**job["args"])
    sizes = model_sizes(job["models"])
    stage, size = job["stage"], job["size"]
    import torch

    torch.manual_seed(0)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if stage.startswith(PRIOR_STAGE):
        figures = stage_train_prior(args, size, sizes, stage.removeprefix(PRIOR_STAGE))
    else:
        figures = globals()[f"stage_{stage}"](args, size, sizes)
    figures["peak_rss"] = peak_rss()
    if args.device == "cuda":
        figures["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    return figures


# ------------------------------------------------------------------------------------- report


def measure(args, models: str, stage: str, size: int) -> dict:
    job = {"args": vars(args), "models": models, "stage": stage, "size": size}
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


COLUMNS = {
    "images_per_second": ("img/s", "{:.3g}"),
    "seconds_per_image_alone": ("s/img (1)", "{:.3g}"),
    "seconds_per_image_batched": ("s/img (batch)", "{:.3g}"),
    "saved_bytes_per_image": ("saved MiB/img", "mib"),
    "estimate": ("est. GiB @cfg batch", "gib"),
    "estimate_checkpointed": ("est. GiB ckpt", "gib"),
    "shard_bytes_per_image": ("shard B/img", "{:.0f}"),
    "jpeg_bytes_per_image": ("JPEG KB/img", "kb"),
    "pixels_bytes_per_image": ("pixels KB/img", "kb"),
    "encoded_bytes_per_image": ("encoded KB/img", "kb"),
    "pixels_build_seconds": ("pixels build s", "{:.2f}"),
    "encoded_build_seconds": ("encoded build s", "{:.2f}"),
    "peak_rss": ("peak RSS GiB", "gib"),
    "cuda_max_allocated": ("CUDA max GiB", "gib"),
}


def cell(value, fmt: str) -> str:
    if fmt == "gib":
        return f"{value / GIB:.2f}"
    if fmt == "mib":
        return f"{value / 2**20:.1f}"
    if fmt == "kb":
        return f"{value / 1000:.1f}"
    return fmt.format(value)


def print_table(models: str, stage: str, rows: dict[int, dict]) -> None:
    present = [c for c in COLUMNS if any(c in r for r in rows.values())]
    baseline = rows.get(min(rows), {})
    print(f"\n{models} sizes, {stage}")
    header = " | ".join(COLUMNS[c][0] for c in present)
    print(f"| px | {header} | vs {min(rows)} px (first column) |")
    print("|---" * (len(present) + 2) + "|")
    for size, r in sorted(rows.items()):
        if "error" in r:
            print(f"| {size} | error: {r['error']} |")
            continue
        cells = [cell(r[c], COLUMNS[c][1]) if c in r else "" for c in present]
        first = present[0] if present else None
        ratio = r[first] / baseline[first] if first and baseline.get(first) else float("nan")
        print(f"| {size} | " + " | ".join(cells) + f" | {ratio:.3g}x |")
    batches = {r.get("estimate_batch") for r in rows.values() if "estimate_batch" in r}
    if batches:
        print(f"(estimates at the config's batch per worker: {sorted(batches)})")


def model_stages(parser, models: str, stages: list[str]) -> list[str]:
    """``stages`` for ``models``, with train_prior as one stage per level of its autoencoder."""
    levels = [name for name, _, _ in model_sizes(models)["levels"]]
    out = []
    for stage in stages:
        if stage == "train_prior":
            out += [PRIOR_STAGE + level for level in levels]
        elif stage.startswith(PRIOR_STAGE) and stage.removeprefix(PRIOR_STAGE) not in levels:
            parser.error(f"{stage}: the {models} autoencoder's levels are {levels}")
        elif stage not in STAGES and not stage.startswith(PRIOR_STAGE):
            parser.error(
                f"unknown stage {stage!r}; stages: {', '.join(STAGES)}, train_prior_<level>"
            )
        else:
            out.append(stage)
    return out


def models_choice(value: str) -> str:
    if value in CONFIGS or Path(value).is_file():
        return value
    raise argparse.ArgumentTypeError(f"{value!r} is neither one of {list(CONFIGS)} nor a file")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument(
        "--models",
        nargs="+",
        default=["cluster", "demo"],
        type=models_choice,
        help=f"sets of model sizes: {', '.join(CONFIGS)}, or config files",
    )
    parser.add_argument(
        "--stages",
        nargs="+",
        default=list(STAGES),
        help="cache, train_vqvae, tokenize, train_prior (one stage per level of the autoencoder), "
        "sample; or train_prior_<level> for one level",
    )
    parser.add_argument("--batch", type=int, default=2, help="batch of the timed steps")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
    parser.add_argument(
        "--sample-batch", type=int, default=4, help="0: sample one image alone only"
    )
    parser.add_argument("--cache-images", type=int, default=64)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="precision of the timed steps (estimates use the config's)",
    )
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return
    results: dict = {}
    stages = {models: model_stages(parser, models, args.stages) for models in args.models}
    for models in args.models:
        for stage in stages[models]:
            rows = {}
            for size in args.sizes:
                start = time.perf_counter()
                rows[size] = measure(args, models, stage, size)
                print(
                    f"  {models} {stage} {size}px: {time.perf_counter() - start:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
            print_table(models, stage, rows)
            results.setdefault(models, {})[stage] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
