"""Benchmark a pinned tokenizer over two corpora, and priors trained on their union.

Trains a small tokenizer (train_vqvae) on corpus A, pins its checkpoint, tokenizes corpus A and
corpus B (generated demo corpora that share one class, "square", and its keys) with it, each into
its own output_dir, then trains the priors on the union of the two code datasets
(``train_prior.shards``) and samples every merged class. Prints each tokenize run's images/s, the
priors' validation bits per code (beside log2 K, a uniform guess) and the sample counts.

    python -m benchmarks.bench_pinned_tokenizer --images-per-class 200 --size 32
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time

from pipelines.config import parse_config
from pipelines.data.demo_data import generate_corpus
from pipelines.runner import run_stages


def _config(output_dir: str, source: str, size: int, args: argparse.Namespace, **sections) -> dict:
    prior = {
        "steps": args.prior_steps,
        "batch_size": 32,
        "eval_every": max(1, args.prior_steps // 2),
        "checkpoint_every": args.prior_steps,
        "holdout_batches": 2,
        "model": {"channels": 32, "num_blocks": 2, "res_blocks": 1, "dropout": 0.0},
    }
    raw = {
        "output_dir": output_dir,
        "data": {"source": source, "image_size": size, "channels": 3},
        "ray": {"num_cpus": os.cpu_count()},
        "train_vqvae": {
            "model": {
                "channels": 32,
                "res_blocks": 1,
                "res_channels": 16,
                "embed_dim": 16,
                "codebook_size_top": 64,
                "codebook_size_bottom": 64,
            },
            "steps": args.vqvae_steps,
            "batch_size": 32,
            "eval_every": args.vqvae_steps,
            "checkpoint_every": args.vqvae_steps,
        },
        "tokenize": {"batch_size": 64, "shard_max_samples": 500},
        "train_prior": {"top": prior, "bottom": {**prior, "model": {**prior["model"]}}},
        "sample": {"per_class": args.per_class, "batch_size": args.per_class},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-class", type=int, default=200)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--vqvae-steps", type=int, default=200)
    parser.add_argument("--prior-steps", type=int, default=200)
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--workdir", default=None, help="default: a temporary folder, removed")
    args = parser.parse_args()

    root = args.workdir or tempfile.mkdtemp(prefix="bench-pinned-")
    corpora = {
        "shapes_a": ("circle", "square"),
        "shapes_b": ("square", "triangle", "cross"),
    }
    for seed, (name, classes) in enumerate(corpora.items()):
        generate_corpus(
            os.path.join(root, name),
            classes=classes,
            images_per_class=args.images_per_class,
            image_size=args.size,
            seed=seed,
            background="palette",
        )
    results: dict = {"images_per_class": args.images_per_class, "image_size": args.size}

    started = time.perf_counter()
    trained = run_stages(
        parse_config(
            _config(
                os.path.join(root, "tokenizer"), os.path.join(root, "shapes_a"), args.size, args
            )
        ),
        stages=["train_vqvae"],
    )["train_vqvae"].manifest
    pinned = os.path.join(root, "tokenizer.pt")
    shutil.copyfile(trained.checkpoint, pinned)
    results["tokenizer_seconds"] = round(time.perf_counter() - started, 1)
    results["tokenizer_validation_mse"] = trained.metrics.get("validation/mse")

    outputs = []
    for name in corpora:
        output = os.path.join(root, f"codes_{name}")
        cfg = parse_config(
            _config(
                output, os.path.join(root, name), args.size, args, tokenize={"checkpoint": pinned}
            )
        )
        manifest = run_stages(cfg, stages=["tokenize"])["tokenize"].manifest
        results[f"tokenize/{name}"] = {
            "samples": manifest.samples,
            "images_per_second": round(manifest.metrics["images_per_second"], 1),
            "seconds": round(manifest.metrics["seconds"], 2),
        }
        outputs.append(output)

    union = os.path.join(root, "union")
    cfg = parse_config(
        _config(
            union,
            os.path.join(root, "shapes_b"),
            args.size,
            args,
            tokenize={"checkpoint": pinned},
            train_prior={"shards": outputs},
        )
    )
    started = time.perf_counter()
    outcomes = run_stages(cfg, stages=["train_prior", "sample"])
    priors = outcomes["train_prior"].manifest
    results["union"] = {
        "class_names": priors.class_names,
        "corpora": [c.model_dump() for c in priors.corpora],
        "validation_bits_per_code": {
            level: round(p.validation_bits_per_code, 3) for level, p in priors.priors.items()
        },
        "uniform_bits_per_code": math.log2(64),
        "prior_and_sample_seconds": round(time.perf_counter() - started, 1),
        "samples": {name: c.count for name, c in outcomes["sample"].manifest.classes.items()},
    }
    print(json.dumps(results, indent=2))
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
