"""PixelSNAIL, gated PixelCNN and the transformer prior on the same code shards, at equal training
wall-clock: validation bits per code, CAS ratio, sampling speed, training memory per image.

Per corpus, one autoencoder is trained and the corpus tokenized once (``vqpipe train-vqvae`` and
``vqpipe tokenize`` in ``<output>/<corpus>/tokenizer``). Each prior kind then gets its own
output_dir, ``<output>/<corpus>/<kind>``, seeded with a copy of those two finished stage folders
(and the MLflow store that recorded them): the runner finds them up to date, skips them, and runs
train_prior, sample and evaluate on the very same shards (checked after each run: the kind's
tokenize manifest must be the tokenizer run's, fingerprint and MLflow run).

The autoencoder is the one-level VQ-VAE of ``configs/demo-vqvae-pixelsnail.yaml`` (one 8x8 map of
64 codes at 32x32): one prior per kind, so the budget goes to the prior being compared and not
half of it to a second level, and the transformer needs no choice of how to read a level above.
Each kind's ``train_prior.codes`` section is the one its demo config ships (PixelSNAIL:
``demo-vqvae-pixelsnail.yaml``, gated PixelCNN: ``demo-vqvae-pixelcnn.yaml``, transformer:
``demo-dalle.yaml``; 0.67M, 1.03M and 0.80M parameters), only ``steps`` (and the evaluation and
checkpoint intervals, a quarter of it) differ.

Equal wall-clock: before training, the stage's own memory probe (``pipelines.stages.train_prior.
memory_probes``: the model, a batch of codes as the workers read it and the stage's loss) times
a few Adam steps of each kind in this process, the kinds in turn; each kind then trains
``--budget-s / seconds per step`` steps. A step's seconds are its CPU seconds on ``--threads``
torch threads (default 1, which every prior's training also gets, ``train_prior.codes.
torch_threads``): on one core of its own that is its wall-clock, and on a shared machine it does
not swing with the neighbours' load as wall-clock does. The same probe gives the training memory
per image (``pipelines.sizing.estimate``: activations and workspace per sample; the weights,
gradients and Adam moments are batch independent and kept apart).

Figures per kind: parameters, seconds per step, steps, validation bits per code at the selected
step (train_prior manifest), the evaluate stage's CAS ratio (generated->real over the size-matched
real->real reference, test split) with its bootstrap 95% interval and ``cas/recognition_ratio``,
samples per second of the sample stage (prior sampling and decoding, same decoder for every kind)
and the memory per image; ratios against PixelSNAIL (the demo's default) measured in the same run.

    python benchmarks/bench_priors.py                             # shapes and digits
    python benchmarks/bench_priors.py --corpora shapes,digits,photos --budget-s 300
    python benchmarks/bench_priors.py --report                    # figures of finished runs only

Corpora: ``shapes`` is the demo's generated corpus (configs/demo.yaml's data section), ``digits``
and ``photos`` are benchmarks/bench_real_corpus.py's folder corpora (scikit-learn, scikit-image).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real_corpus import digits_corpus, photo_corpus, vqpipe, write_corpus  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
BASE = CONFIGS / "demo-vqvae-pixelsnail.yaml"
# Each kind's prior section as its demo config ships it.
KIND_CONFIGS = {
    "pixelsnail": CONFIGS / "demo-vqvae-pixelsnail.yaml",
    "pixelcnn": CONFIGS / "demo-vqvae-pixelcnn.yaml",
    "transformer": CONFIGS / "demo-dalle.yaml",
}
BASELINE = "pixelsnail"
# Stage folders the kinds share, and the MLflow store whose runs their manifests name.
SHARED = ("train_vqvae", "tokenize", "mlflow.db", "mlartifacts")


def load() -> str:
    return "load average {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())


def corpus_data(corpus: str, folder: Path) -> dict:
    """The config's data section: the demo's generated shapes, or a written folder corpus."""
    data = yaml.safe_load((CONFIGS / "demo.yaml").read_text())["data"]
    data["source"] = str(folder)
    if corpus == "shapes":
        return data  # generated into ``folder`` on the first run (data.generate)
    images = digits_corpus() if corpus == "digits" else photo_corpus(tiles_per_class=260)
    counts = write_corpus(images, folder)
    print(f"corpus {corpus}: {sum(counts.values())} images in {len(counts)} classes", flush=True)
    data.pop("generate")
    return data


def base_config(output: Path, data: dict) -> dict:
    raw = yaml.safe_load(BASE.read_text())
    raw["output_dir"] = str(output)
    raw["data"] = data
    raw["mlflow"]["registered_models"] = {"autoencoder": "bench-tokenizer", "prior": "bench-prior"}
    return raw


def kind_section(kind: str) -> dict:
    return yaml.safe_load(KIND_CONFIGS[kind].read_text())["train_prior"]["codes"]


def write_config(raw: dict, output: Path) -> Path:
    output.mkdir(parents=True, exist_ok=True)
    path = output / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run(*args: str) -> None:
    command = [*vqpipe(), *args]
    print(f"  $ {' '.join(command)}", flush=True)
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def manifest(output: Path, stage: str) -> dict:
    path = output / stage / "manifest.json"
    if not path.exists():
        raise SystemExit(f"{path} does not exist: has the pipeline run to the end?")
    return json.loads(path.read_text())


def probe_figures(configs: dict[str, Path], steps: int, threads: int) -> dict[str, dict]:
    """Per kind: parameters, seconds per training step and memory per image of the config's
    prior, from the train_prior stage's own memory probe.

    A step's cost is its CPU seconds on ``threads`` torch threads (with one thread, its wall-clock
    on a core of its own): on a shared machine, wall-clock swings with the neighbours' load while
    CPU seconds do not. The kinds take their steps in turn, so a swing that remains reaches all."""
    import torch

    from pipelines.config import load_config
    from pipelines.sizing import estimate
    from pipelines.stages.train_prior import memory_probes

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    probes = {kind: memory_probes(load_config(str(path)))[0] for kind, path in configs.items()}
    models = {kind: probe.build().train() for kind, probe in probes.items()}
    optimizers = {
        kind: torch.optim.Adam(models[kind].parameters(), lr=probe.knobs.lr)
        for kind, probe in probes.items()
    }
    batches = {kind: probe.make_batch(probe.knobs.batch_size) for kind, probe in probes.items()}
    times: dict[str, list[float]] = {kind: [] for kind in probes}
    for step in range(steps + 2):  # two warm-up steps
        for kind, probe in probes.items():
            started = time.process_time()
            loss, _ = probe.loss_fn(models[kind], batches[kind], step)
            loss.backward()
            optimizers[kind].step()
            optimizers[kind].zero_grad(set_to_none=True)
            times[kind].append((time.process_time() - started) / threads)
    figures = {}
    for kind, probe in probes.items():
        memory = estimate(probe)
        figures[kind] = {
            "params": sum(p.numel() for p in models[kind].parameters()),
            "step_seconds": float(np.median(times[kind][2:])),
            "batch_size": probe.knobs.batch_size,
            "threads": threads,
            "memory_per_image": memory.per_sample_bytes,
            "memory_fixed": memory.fixed_bytes,
            "memory_peak": memory.peak_bytes,
        }
    return figures


def sampling_seconds(config: Path, threads: int) -> float:
    """CPU seconds (on ``threads`` threads) of the prior drawing ``sample.batch_size`` code maps,
    one class each in turn, at ``sample.temperature``, with its sampling cache: the prior's part
    of the sample stage, which the stage's wall-clock mixes with decoding and the machine's load.
    The weights do not change the work, so the probe's untrained model stands in."""
    import torch

    from pipelines.config import load_config
    from pipelines.stages.train_prior import memory_probes

    cfg = load_config(str(config))
    (probe,) = memory_probes(cfg)
    torch.set_num_threads(threads)
    model = probe.build().eval()
    n = cfg.sample.batch_size
    labels = torch.arange(n) % max(1, model.config.num_classes)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.sample(2, labels=labels[:2], temperature=cfg.sample.temperature, generator=generator)
        started = time.process_time()
        model.sample(n, labels=labels, temperature=cfg.sample.temperature, generator=generator)
    return (time.process_time() - started) / threads


def bench_corpus(corpus: str, args: argparse.Namespace) -> None:
    root = args.output / corpus
    data = corpus_data(corpus, root / "corpus")
    tokenizer = root / "tokenizer"
    base = base_config(tokenizer, data)
    config = write_config(base, tokenizer)
    print(f"[{corpus}] autoencoder and codes, once ({load()})", flush=True)
    started = time.time()
    run("train-vqvae", str(config))
    run("tokenize", str(config))
    tok = manifest(tokenizer, "tokenize")
    print(
        f"[{corpus}] {tok['samples']} images tokenized; {time.time() - started:.0f} s", flush=True
    )

    configs = {}
    for kind in args.kinds:
        raw = json.loads(json.dumps(base))
        raw["output_dir"] = str(root / kind)
        raw["train_prior"] = {"codes": {**kind_section(kind), "torch_threads": args.threads}}
        configs[kind] = raw
    # A kind that finished in an earlier run keeps the figures (and steps) it trained with.
    done = {
        kind: json.loads((root / kind / "bench.json").read_text())
        for kind in args.kinds
        if (root / kind / "bench.json").exists()
    }
    todo = [kind for kind in args.kinds if kind not in done]
    probes = probe_figures(
        {kind: write_config(configs[kind], tokenizer / "probe" / kind) for kind in todo},
        args.probe_steps,
        args.threads,
    )
    probes = {kind: done.get(kind) or probes[kind] for kind in args.kinds}
    for kind, figures in probes.items():
        if "sample_cpu_seconds" not in figures:
            figures["sample_cpu_seconds"] = sampling_seconds(
                write_config(configs[kind], tokenizer / "probe" / kind), args.threads
            )
            figures["sample_batch"] = configs[kind]["sample"]["batch_size"]
            if kind in done:
                (root / kind / "bench.json").write_text(json.dumps(figures, indent=1))
    for kind, figures in probes.items():
        print(
            f"[{corpus}] {kind}: {figures['params'] / 1e6:.2f}M parameters, "
            f"{figures['step_seconds']:.3f} s/step at batch {figures['batch_size']}, "
            f"{figures['sample_cpu_seconds']:.2f} s to sample a batch",
            flush=True,
        )

    for kind in args.kinds:
        output = root / kind
        if kind in done:
            print(f"[{corpus}] {kind}: finished in an earlier run, {done[kind]['steps']} steps")
            continue
        steps = max(4, int(args.budget_s / probes[kind]["step_seconds"]))
        every = max(1, math.ceil(steps / 4))
        section = configs[kind]["train_prior"]["codes"]
        section.update(steps=steps, eval_every=every, checkpoint_every=every)
        section["log_every"] = min(section.get("log_every", 25), every)
        section.pop("early_stopping", None)
        for shared in SHARED:
            source, target = tokenizer / shared, output / shared
            if source.exists() and not target.exists():
                copy = shutil.copytree if source.is_dir() else shutil.copy2
                copy(source, target)
        config = write_config(configs[kind], output)
        print(f"[{corpus}] {kind}: {steps} steps ({load()})", flush=True)
        started = time.time()
        run("run", str(config))
        seconds = time.time() - started
        kind_tok = manifest(output, "tokenize")
        if (kind_tok["fingerprint"], kind_tok["mlflow_run_id"]) != (
            tok["fingerprint"],
            tok["mlflow_run_id"],
        ):
            raise SystemExit(f"{output}: tokenize ran again; the kinds would not share the shards")
        figures = {**probes[kind], "steps": steps, "budget_s": args.budget_s}
        figures["pipeline_seconds"] = seconds
        (output / "bench.json").write_text(json.dumps(figures, indent=1))
        print(f"[{corpus}] {kind}: train_prior, sample, evaluate took {seconds:.0f} s", flush=True)


def figures_of(output: Path) -> dict:
    bench = json.loads((output / "bench.json").read_text())
    (prior,) = manifest(output, "train_prior")["priors"].values()
    sample = manifest(output, "sample")
    m = manifest(output, "evaluate")["metrics"]
    return {
        **bench,
        "trained_steps": prior.get("trained_steps") or prior["steps"],
        "selected_step": prior["selected_step"],
        "bits": prior["validation_bits_per_code"],
        "cas": m.get("cas/ratio", float("nan")),
        "cas_low": m.get("cas/ratio/ci_low", float("nan")),
        "cas_high": m.get("cas/ratio/ci_high", float("nan")),
        "recognition": m.get("cas/recognition_ratio", float("nan")),
        "samples_per_second": sample["samples"] / sample["sampling_seconds"],
        "samples": sample["samples"],
        "samples_per_cpu_second": bench["sample_batch"] / bench["sample_cpu_seconds"],
    }


def report(args: argparse.Namespace) -> None:
    for corpus in args.corpora:
        rows = {}
        for kind in args.kinds:
            if (args.output / corpus / kind / "bench.json").exists():
                rows[kind] = figures_of(args.output / corpus / kind)
        if not rows:
            print(f"\n{corpus}: no finished runs under {args.output / corpus}")
            continue
        tok = manifest(args.output / corpus / "tokenizer", "tokenize")
        print(
            f"\n{corpus}: {tok['samples']} images, {len(tok['class_names'])} classes, codes "
            f"{tok['codebook_sizes']} per level (log2 K = {np.log2(tok['codebook_sizes']['codes']):.0f} "
            f"bits); budget {next(iter(rows.values()))['budget_s']:.0f} s of training per kind"
        )
        print(
            f"{'kind':<12}{'params':>8}{'s/step':>8}{'steps':>7}{'val bits':>10}"
            f"{'CAS ratio [95% CI]':>24}{'recog.':>8}{'samples/s':>11}{'prior/s':>9}{'MiB/image':>11}"
        )
        for kind, r in rows.items():
            print(
                f"{kind:<12}{r['params'] / 1e6:>7.2f}M{r['step_seconds']:>8.3f}{r['steps']:>7d}"
                f"{r['bits']:>10.3f}{r['cas']:>9.3f} [{r['cas_low']:.3f}, {r['cas_high']:.3f}]"
                f"{r['recognition']:>8.3f}{r['samples_per_second']:>11.1f}"
                f"{r['samples_per_cpu_second']:>9.1f}"
                f"{r['memory_per_image'] / 2**20:>11.2f}"
            )
        base = rows.get(BASELINE)
        if base is None:
            continue
        print(f"against {BASELINE} (same run):")
        for kind, r in rows.items():
            if kind == BASELINE:
                continue
            print(
                f"  {kind:<12}bits {r['bits'] - base['bits']:+.3f}, CAS ratio "
                f"{r['cas'] - base['cas']:+.3f}, samples/s "
                f"x{r['samples_per_second'] / base['samples_per_second']:.2f} (stage), "
                f"x{r['samples_per_cpu_second'] / base['samples_per_cpu_second']:.2f} (prior), "
                f"memory/image x{r['memory_per_image'] / base['memory_per_image']:.2f}, "
                f"step time x{r['step_seconds'] / base['step_seconds']:.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "bench-priors")
    parser.add_argument(
        "--corpora", default="shapes,digits", help="comma-separated: shapes, digits, photos"
    )
    parser.add_argument("--kinds", default="pixelsnail,pixelcnn,transformer")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=150.0,
        help="training seconds per kind (steps = budget / measured seconds per step)",
    )
    parser.add_argument("--probe-steps", type=int, default=5, help="timed steps per kind")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the probe and of each prior's training (train_prior.*.torch_threads)",
    )
    parser.add_argument("--report", action="store_true", help="only print finished runs' figures")
    args = parser.parse_args()
    args.output = args.output.resolve()
    args.corpora = args.corpora.split(",")
    args.kinds = args.kinds.split(",")
    for name in args.corpora:
        if name not in ("shapes", "digits", "photos"):
            parser.error(f"--corpora: unknown corpus {name!r}; expected shapes, digits or photos")
    for name in args.kinds:
        if name not in KIND_CONFIGS:
            parser.error(f"--kinds: unknown kind {name!r}; expected one of {sorted(KIND_CONFIGS)}")
    if not args.report:
        started = time.time()
        for corpus in args.corpora:
            bench_corpus(corpus, args)
        print(f"\nbench took {time.time() - started:.0f} s; {load()} at the end")
    report(args)


if __name__ == "__main__":
    main()
