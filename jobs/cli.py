"""The ``vqpipe`` command line.

    vqpipe run CONFIG.yaml [--set key=value ...] [--force STAGE ...]
    vqpipe train-vqvae|tokenize|train-prior|sample|evaluate CONFIG.yaml [--set ...] [--force]
    vqpipe reconstruct --checkpoint CKPT --input DIR --output DIR
    vqpipe validate CONFIG.yaml [--set ...]

With no ``ray.address`` a local Ray starts in this process; MLflow tracks to
``<output_dir>/mlflow.db`` unless ``mlflow.tracking_uri`` is set.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

STAGE_COMMANDS = {
    "train-vqvae": "train_vqvae",
    "tokenize": "tokenize",
    "train-prior": "train_prior",
    "sample": "sample",
    "evaluate": "evaluate",
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML configuration file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train_vqvae.steps=500 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vqpipe",
        description="VQ-VAE-2 pipeline: train, tokenize, train priors, sample, evaluate.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run every stage in order, skipping those already up to date")
    _add_config_args(p)
    p.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="STAGE",
        help="redo STAGE even if up to date (repeatable; 'all' redoes everything); stages downstream follow",
    )

    for command, stage in STAGE_COMMANDS.items():
        p = sub.add_parser(command, help=f"run the {stage} stage alone")
        _add_config_args(p)
        p.add_argument("--force", action="store_true", help="redo the stage even if up to date")

    p = sub.add_parser(
        "validate", help="check a configuration and print it with defaults filled in"
    )
    _add_config_args(p)

    p = sub.add_parser("reconstruct", help="write reconstructions of an image folder (same layout)")
    p.add_argument(
        "--checkpoint", required=True, help="autoencoder checkpoint (model.pt) path or URL"
    )
    p.add_argument("--input", required=True, help="image folder (any layout of image files)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument(
        "--image-size", type=int, nargs="+", default=None, help="H [W]; default from the checkpoint"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--side-by-side", action="store_true", help="write original|reconstruction pairs"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from pipelines.config import ConfigError, load_config

    try:
        if args.command == "reconstruct":
            from pipelines.reconstruct import reconstruct_folder

            size = tuple(args.image_size) if args.image_size else None
            summary = reconstruct_folder(
                args.checkpoint,
                args.input,
                args.output,
                image_size=size,
                batch_size=args.batch_size,
                side_by_side=args.side_by_side,
            )
            print(json.dumps(summary, indent=2))
            return 0

        cfg = load_config(args.config, args.overrides)
        if args.command == "validate":
            print(json.dumps(cfg.model_dump(mode="json"), indent=2))
            return 0

        from pipelines.runner import run_stages

        if args.command == "run":
            manifests = run_stages(cfg, force=args.force)
        else:
            stage = STAGE_COMMANDS[args.command]
            manifests = run_stages(cfg, stages=[stage], force=[stage] if args.force else [])
        print(_summary(manifests))
        return 0
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"vqpipe: error: {err}", file=sys.stderr)
        return 2


# The figures a person looks at first, per stage.
SUMMARY_METRICS = {
    "train_vqvae": ("holdout/mse", "holdout/perplexity/top", "holdout/perplexity/bottom"),
    "evaluate": (
        "holdout/psnr",
        "cas/generated_to_real",
        "cas/real_to_generated",
        "cas/real_to_real",
    ),
}


def _summary(manifests: dict) -> str:
    lines = ["", "vqpipe finished:"]
    for stage, m in manifests.items():
        metrics = m.get("metrics") or {}
        if stage == "tokenize":
            extra = f"{m.get('samples')} samples in {len(m.get('shards', []))} shards, {m['bad_inputs']['count']} bad inputs"
        elif stage == "train_prior":
            bits = {
                lvl: round(p["heldout_bits_per_code"], 3) for lvl, p in m.get("priors", {}).items()
            }
            extra = f"held-out bits/code {bits}"
        elif stage == "sample":
            extra = f"{m.get('samples')} images of {len(m.get('classes', {}))} classes"
        else:
            shown = [(k, metrics[k]) for k in SUMMARY_METRICS.get(stage, ()) if k in metrics]
            extra = ", ".join(f"{k}={v:.4g}" for k, v in shown)
        took = "skipped" if m.get("skipped") else f"{m.get('seconds', 0):.1f}s"
        lines.append(f"  {stage:<12} {took:>9}  {extra}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
