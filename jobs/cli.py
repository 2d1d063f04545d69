"""The ``vqpipe`` command line.

    vqpipe run CONFIG.yaml [--set key=value ...] [--force STAGE ...]
    vqpipe STAGE CONFIG.yaml [--set ...] [--force]       # one stage: train-vqvae, tokenize, ...
    vqpipe tokenize --checkpoint CKPT --input CORPUS --output DIR [--set ...]   # no config file
    vqpipe reconstruct --checkpoint CKPT --input DIR --output DIR
    vqpipe decode --checkpoint CKPT --input SHARDS --output DIR
    vqpipe validate CONFIG.yaml [--set ...]
    vqpipe status CONFIG.yaml [--set ...]                # done / stale / partial, runs nothing

With no ``ray.address`` a local Ray starts in this process; MLflow tracks to
``<output_dir>/mlflow.db`` unless ``mlflow.tracking_uri`` is set. A mistake in the config or the
inputs prints ``vqpipe: error: ...`` and exits with status 2; anything else is a bug, printed with
its traceback (status 1). Ctrl-C or SIGTERM stops a run at once: ``vqpipe: interrupted``, status
130 or 143 (``pipelines.interrupts``).

While stages run, the console shows a line per stage, its progress and its summary
(``pipelines.console``); Ray's, Ray Data's and the workers' logs go to ``<output_dir>/logs/``
(``pipelines.logs``) unless ``--verbose``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from importlib.metadata import PackageNotFoundError, version

from pipelines.errors import UserError
from pipelines.stages import STAGES, get_stage


def _version() -> str:
    try:
        return version("vqpipe")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "unknown"


def _add_config_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    if optional:
        p.add_argument("config", nargs="?", help="YAML configuration file (optional, see below)")
    else:
        p.add_argument("config", help="YAML configuration file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train_vqvae.steps=500 (repeatable)",
    )
    # Also after the command; SUPPRESS leaves the top-level flag's value when not given here.
    p.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vqpipe",
        description="VQ-VAE-2 pipeline: train, tokenize, train priors, sample, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"vqpipe {_version()}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show Ray's, Ray Data's and the workers' logs (otherwise in <output_dir>/logs/)",
    )
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

    for spec in STAGES:
        p = sub.add_parser(spec.verb, help=f"{spec.description} (this stage alone)")
        _add_config_args(p, optional=spec.name == "tokenize")
        p.add_argument("--force", action="store_true", help="redo the stage even if up to date")
        if spec.name == "tokenize":
            p.add_argument(
                "--checkpoint",
                help="pinned autoencoder: checkpoint path or URL, or models:/<name>/<version or "
                "@alias>; sets tokenize.checkpoint",
            )
            p.add_argument("--input", help="the corpus to encode; sets data.source")
            p.add_argument("--output", help="where the code dataset goes; sets output_dir")
            p.epilog = (
                "Without CONFIG, --checkpoint, --input and --output are required and the rest of "
                "the configuration takes its defaults, with data.image_size and data.channels "
                "read from the checkpoint (unless --set)."
            )

    p = sub.add_parser(
        "validate", help="check a configuration and print it with defaults filled in"
    )
    _add_config_args(p)

    p = sub.add_parser(
        "status", help="say which stages are done, stale, partial or not started; runs nothing"
    )
    _add_config_args(p)

    p = sub.add_parser("reconstruct", help="write reconstructions of an image folder (same layout)")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="autoencoder checkpoint (model.pt) path or URL, or a registered model "
        "models:/<name>/<version or alias> (MLflow server from MLFLOW_TRACKING_URI)",
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

    p = sub.add_parser(
        "decode", help="turn code shards back into images, in the corpus' layout (Ray Data)"
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="autoencoder checkpoint path or URL, or models:/<name>/<version or alias>",
    )
    p.add_argument(
        "--input",
        required=True,
        help="a tokenize stage folder, a folder of .tar shards, a .tar file or a brace pattern",
    )
    p.add_argument("--output", required=True, help="output folder: <key>.png per sample")
    p.add_argument(
        "--image-size", type=int, nargs="+", default=None, help="H [W]; default from the checkpoint"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-actors", type=int, default=1, help="decoder replicas")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    return parser


def _reconstruct(args: argparse.Namespace) -> int:
    from pipelines.tools.reconstruct import reconstruct_folder

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


def _decode(args: argparse.Namespace) -> int:
    from types import SimpleNamespace

    from pipelines.config import RaySection
    from pipelines.stage import ensure_ray
    from pipelines.tools.decode import decode_shards

    ensure_ray(SimpleNamespace(ray=RaySection()))  # joins RAY_ADDRESS's cluster, else local
    summary = decode_shards(
        args.checkpoint,
        args.input,
        args.output,
        image_size=tuple(args.image_size) if args.image_size else None,
        batch_size=args.batch_size,
        num_actors=args.num_actors,
        cpus_per_actor=args.cpus_per_actor,
    )
    print(json.dumps(summary, indent=2))
    return 0


def _one_line_tokenize_config(args: argparse.Namespace):
    """The configuration of ``vqpipe tokenize --checkpoint --input --output``: defaults, the three
    options, the image size and channels of the checkpoint, then --set."""
    from pipelines.config import parse_config
    from pipelines.errors import ConfigError
    from pipelines.tokenizer import read_tokenizer, tracking_uri_for

    missing = [f"--{name}" for name in ("checkpoint", "input", "output") if not getattr(args, name)]
    if missing:
        raise ConfigError(
            f"vqpipe tokenize needs a CONFIG file, or --checkpoint, --input and --output "
            f"(missing: {', '.join(missing)})"
        )
    raw = {
        "output_dir": args.output,
        "data": {"source": args.input},
        "tokenize": {"checkpoint": args.checkpoint},
    }
    draft = parse_config(raw, args.overrides)
    pinned = read_tokenizer(draft.tokenize.checkpoint, tracking_uri_for(draft))
    if pinned.image_size is not None:
        raw["data"]["image_size"] = list(pinned.image_size)
    raw["data"]["channels"] = pinned.channels
    return parse_config(raw, args.overrides)


def _load(args: argparse.Namespace):
    from pipelines.config import load_config

    one_line = {"checkpoint": "tokenize.checkpoint", "input": "data.source", "output": "output_dir"}
    if getattr(args, "command", None) == "tokenize" and args.config is None:
        return _one_line_tokenize_config(args)
    overrides = list(args.overrides)
    for option, key in one_line.items():
        if getattr(args, option, None) and args.command == "tokenize":
            overrides.insert(0, f"{key}={getattr(args, option)}")
    return load_config(args.config, overrides)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "reconstruct":
        return _reconstruct(args)
    if args.command == "decode":
        return _decode(args)
    cfg = _load(args)
    if args.command == "validate":
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return 0
    if args.command == "status":
        from pipelines.status import format_status, pipeline_status

        print(format_status(pipeline_status(cfg)))
        return 0

    return _run_stages(args, cfg)


# Where the running command's logs go, for the error message of a failed run.
_log_dir: str | None = None


def _run_stages(args: argparse.Namespace, cfg) -> int:
    global _log_dir
    from pipelines import console, interrupts, logs
    from pipelines.runner import run_stages

    shown = console.Console(quiet=args.quiet)
    with (
        interrupts.stop_on_signals(),
        console.active(shown),
        logs.routed_logs(cfg.output_dir, shown, verbose=args.verbose) as (log_dir),
    ):
        _log_dir = log_dir
        if not args.verbose:
            shown.line(f"vqpipe: logs in {log_dir} (--verbose shows them here)")
        if args.command == "run":
            outcomes = run_stages(cfg, force=args.force)
        else:
            stage = get_stage(args.command).name
            outcomes = run_stages(cfg, stages=[stage], force=[stage] if args.force else [])
        shown.run_finished()
    print(_summary(outcomes))
    return 0


def _runs_stages(command: str) -> bool:
    return command == "run" or command in {spec.verb for spec in STAGES}


def main(argv: list[str] | None = None) -> int:
    global _log_dir
    args = build_parser().parse_args(argv)
    _log_dir = None
    if not _runs_stages(args.command):  # a stage run routes its logs itself (pipelines.logs)
        logging.basicConfig(
            level=logging.WARNING if args.quiet else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
    try:
        return _dispatch(args)
    except UserError as err:
        print(f"vqpipe: error: {err}", file=sys.stderr)
        _where_logs()
        return 2
    except Exception:  # a bug, not the user's mistake: show where it happened
        traceback.print_exc()
        print("vqpipe: internal error (traceback above)", file=sys.stderr)
        _where_logs()
        return 1
    except (KeyboardInterrupt, SystemExit) as stop:  # SIGINT, SIGTERM: pipelines.interrupts
        if _log_dir is None:
            raise
        print("vqpipe: interrupted", file=sys.stderr)
        _where_logs()
        from pipelines import interrupts

        interrupts.exit_now(stop)


def _where_logs() -> None:
    if _log_dir is not None:
        print(f"vqpipe: Ray's and the workers' logs are in {_log_dir}", file=sys.stderr)


def _summary(outcomes: dict) -> str:
    lines = ["", "vqpipe finished:"]
    for stage, outcome in outcomes.items():
        extra = outcome.manifest.summary()
        took = "skipped" if outcome.skipped else f"{outcome.manifest.seconds:.1f}s"
        lines.append(f"  {stage:<12} {took:>9}  {extra}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
