"""Sampling settings compared by CAS on the VALIDATION split of a finished pipeline run.

The evaluate stage publishes CAS on the test split, which nothing may be tuned on. This draws
samples from a finished run's priors with other sample settings (each into its own folder under
``<output_dir>/cas-sweep/``, the run's own stages untouched) and scores them exactly as the evaluate
stage does (``pipelines.evaluation.metrics.classification_metrics``: a classifier on the samples,
one on as many real train images per class, a judge) except that the real images scored on are
the validation split's.

    python benchmarks/cas_validation_sweep.py runs/bench-real-digits/config.yaml \
        --setting temperature=0.8 --setting temperature=1.0 \
        --setting temperature=1.0,rejection.enabled=true --seeds 2

A setting is comma-separated ``sample.*`` keys (without the ``sample.`` prefix); ``--set`` applies
config overrides to every setting (e.g. ``evaluate.classifier_steps=400``).

``--setting reconstructions`` scores the tokenizer instead of a prior: in place of samples, the
autoencoder's reconstructions of the very real train images that the real-to-real classifier of
each seed trains on (as many per class as a setting draws). Its ratio is what a perfect prior over
these codes would reach, so it tells whether the prior or the tokenizer holds the figure back.
"""

from __future__ import annotations

import argparse
import json
import time

import yaml


def main() -> None:
    from pipelines.config import load_config
    from pipelines.data import storage
    from pipelines.evaluation.metrics import classification_metrics
    from pipelines.generation import draw_samples, draws_per_class, prior_order
    from pipelines.manifest import require_manifest
    from pipelines.stage import StageContext
    from pipelines.stage_manifests import TokenizeManifest, TrainPriorManifest
    from pipelines.tracking import TrackingContext

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--setting", action="append", required=True)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--seeds", type=int, default=1, help="sampling seeds per setting")
    args = parser.parse_args()

    results = []
    for setting in args.setting:
        overrides = list(args.set)
        if setting != "reconstructions":
            overrides += [f"sample.{item.strip()}" for item in setting.split(",")]
        cfg = load_config(args.config, overrides)
        tok = require_manifest(cfg.output_dir, TokenizeManifest)
        name = setting.replace("=", "").replace(",", "_").replace(".", "")
        started = time.time()
        sets = []
        if setting == "reconstructions":  # needs the tokenize stage only
            draws = draws_per_class(cfg.sample, list(tok.class_names))
            sets = reconstructions(cfg, tok, draws, args.seeds)
        else:
            trained = require_manifest(cfg.output_dir, TrainPriorManifest)
            classes = list(trained.class_names)
            draws = draws_per_class(cfg.sample, classes)
            for offset in range(args.seeds):
                seed = cfg.sample.seed + offset
                where = storage.join(cfg.output_dir, "cas-sweep", name, f"seed-{seed}")
                tracking = TrackingContext("sqlite://", None)
                ctx = StageContext(cfg, "sample", where, "sweep", tracking)
                entries = draw_samples(ctx, trained, prior_order(trained), classes, seed, draws)
                sets.append((seed, {c: e.dir for c, e in entries.items()}))
        sampled = time.time() - started
        where = storage.join(cfg.output_dir, "cas-sweep", name, "evaluate")
        avoid = cfg.sample.seed if cfg.sample.rejection.enabled else None
        scores = classification_metrics(
            cfg, where, tok.class_names, sets, (*tok.image_size, tok.channels), avoid, "validation"
        )
        m = scores.metrics
        row = {"setting": setting, "overrides": args.set, "sample_seconds": round(sampled)}
        row.update({k: v for k, v in m.items() if "/class/" not in k})
        row["per_class"] = {
            k.rsplit("/", 1)[-1]: round(v, 3)
            for k, v in m.items()
            if k.startswith("cas/generated_to_real/class/")
        }
        results.append(row)
        print(
            f"{setting:50s} validation CAS {m['cas/generated_to_real']:.3f} real {m['cas/real_to_real']:.3f} "
            f"ratio {m['cas/ratio']:.3f} [{m.get('cas/ratio/ci_low', float('nan')):.3f}, "
            f"{m.get('cas/ratio/ci_high', float('nan')):.3f}] judge {m['cas/real_to_generated']:.3f} "
            f"recognition ratio {m.get('cas/recognition_ratio', float('nan')):.3f} "
            f"({len(sets)} seed(s), sampling {sampled:.0f} s)",
            flush=True,
        )
        print("   per class:", json.dumps(row["per_class"]), flush=True)
    out = storage.join(load_config(args.config).output_dir, "cas-sweep", "results.yaml")
    previous = yaml.safe_load(storage.read_bytes(out)) if storage.exists(out) else []
    storage.write_bytes(out, yaml.safe_dump(previous + results).encode())


def reconstructions(cfg, tok, draws: int, seeds: int) -> list:
    """Per seed, the autoencoder's reconstructions of ``draws`` real train images of each class:
    those that seed's real-to-real classifier trains on (``matched_subset`` with the same pool and
    salt as ``score_seed``), written as PNGs per class like a sample stage's."""
    import torch

    from pipelines.data import storage
    from pipelines.data.corpus import open_corpus
    from pipelines.data.images import encode_png, to_uint8
    from pipelines.evaluation.cas import matched_subset
    from pipelines.evaluation.classifier import labelled_images
    from pipelines.tools.reconstruct import load_autoencoder

    model, _ = load_autoencoder(tok.checkpoint)
    model.eval()
    pool = labelled_images(open_corpus(cfg.data).dataset("train"), cfg.evaluate.max_images)
    sets = []
    for offset in range(seeds):
        seed = cfg.seed + offset
        chosen = matched_subset(pool, dict.fromkeys(range(len(tok.class_names)), draws), salt=seed)
        with torch.inference_mode():  # in batches, as the sample stage decodes
            recon = torch.cat(
                [
                    model.decode_codes(model.encode(batch)).clamp(-1, 1)
                    for batch in chosen.images.split(cfg.sample.batch_size)
                ]
            )
        where = storage.join(cfg.output_dir, "cas-sweep", "reconstructions", f"seed-{seed}")
        dirs = {}
        for key, label, pixels in zip(chosen.keys, chosen.labels.tolist(), to_uint8(recon)):
            name = tok.class_names[label]
            dirs[name] = storage.join(where, name)
            storage.write_bytes(
                storage.join(dirs[name], key.replace("/", "_") + ".png"), encode_png(pixels)
            )
        sets.append((seed, dirs))
    return sets


if __name__ == "__main__":
    main()
