"""The ``vqpipe`` command line.

    vqpipe run CONFIG.yaml [--set key=value ...] [--force STAGE ...]
    vqpipe STAGE CONFIG.yaml [--set ...] [--force]       # one stage alone (vqpipe --help)
    vqpipe STAGE [CONFIG.yaml] [OPTIONS ...]             # a stage's own options, if it has any
    vqpipe reconstruct --checkpoint CKPT --input DIR --output DIR
    vqpipe decode --checkpoint CKPT --input SHARDS --output DIR
    vqpipe validate CONFIG.yaml [--set ...]
    vqpipe status CONFIG.yaml [--set ...]                # done / stale / partial, runs nothing

With no ``ray.address`` a local Ray starts in this process; MLflow tracks to
``<output_dir>/mlflow.db`` unless ``mlflow.tracking_uri`` is set. A mistake in the config or the
inputs prints ``vqpipe: error: ...`` and exits with status 2; anything else is a bug, printed with
its traceback (status 1). Ctrl-C or SIGTERM stops a run at once: ``vqpipe: interrupted``, status
130 or 143 (``pipelines.interrupts``).

A command per stage comes from the stage's declaration (``pipelines.stage.StageSpec``): its
options, and the configuration they make, are the stage's, so this module names no stage.

While stages run, the console shows a line per stage, its progress and its summary
(``pipelines.console``); Ray's, Ray Data's and the workers' logs go to ``<output_dir>/logs/``
(``pipelines.logs``) unless ``--verbose``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from types import SimpleNamespace
from typing import Any

from pipelines.config import PipelineConfig, RaySection
from pipelines.errors import ConfigError, user_error_in
from pipelines.stage import StageSpec, ensure_ray
from pipelines.stages import STAGES
from pipelines.tools.decode import decode_shards
from pipelines.tools.reconstruct import reconstruct_folder


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


def build_parser(stages: Sequence[StageSpec] | None = None) -> argparse.ArgumentParser:
    """The parser of every command; ``stages`` (default: the registry) give one command each."""
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
    _add_run_options(
        sub.add_parser("run", help="run every stage in order, skipping those already up to date")
    )
    for spec in STAGES if stages is None else stages:
        _add_stage_options(
            sub.add_parser(spec.verb, help=f"{spec.description} (this stage alone)"), spec
        )
    validate = sub.add_parser(
        "validate",
        help="check a configuration, print it with defaults filled in (stdout) and each training "
        "stage's estimated memory per worker (stderr)",
    )
    _add_config_args(validate)
    validate.add_argument(
        "--no-memory",
        action="store_true",
        help="skip the memory estimates (each runs a few training steps of its model on the CPU)",
    )
    _add_config_args(
        sub.add_parser(
            "status", help="say which stages are done, stale, partial or not started; runs nothing"
        )
    )
    _add_reconstruct_options(
        sub.add_parser("reconstruct", help="write reconstructions of an image folder (same layout)")
    )
    _add_decode_options(
        sub.add_parser(
            "decode", help="turn code shards back into images, in the corpus' layout (Ray Data)"
        )
    )
    return parser


def _add_run_options(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="STAGE",
        help="redo STAGE even if up to date (repeatable; 'all' redoes everything); stages downstream follow",
    )


def _add_stage_options(p: argparse.ArgumentParser, spec: StageSpec) -> None:
    """One stage alone: CONFIG, --set, --force and the options its declaration adds."""
    # A stage that builds its configuration from its own options may do without CONFIG.
    _add_config_args(p, optional=spec.config_from_args is not None)
    p.add_argument("--force", action="store_true", help="redo the stage even if up to date")
    if spec.cli_options is not None:
        spec.cli_options(p)
    p.set_defaults(stage_spec=spec)


def _add_reconstruct_options(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--batch-size", type=int, default=_default(reconstruct_folder, "batch_size"))
    p.add_argument(
        "--side-by-side", action="store_true", help="write original|reconstruction pairs"
    )


def _add_decode_options(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--batch-size", type=int, default=_default(decode_shards, "batch_size"))
    p.add_argument(
        "--num-actors",
        type=int,
        default=_default(decode_shards, "num_actors"),
        help="decoder replicas",
    )
    p.add_argument(
        "--cpus-per-actor", type=float, default=_default(decode_shards, "cpus_per_actor")
    )


def _default(tool: Callable[..., Any], parameter: str) -> Any:
    """The tool's own default for ``parameter``, so that an option left out changes nothing."""
    return inspect.signature(tool).parameters[parameter].default


def _reconstruct(args: argparse.Namespace) -> int:
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


def _load(args: argparse.Namespace) -> PipelineConfig:
    """The configuration of the command: the stage's own, if it builds one, else CONFIG + --set."""
    from pipelines.config import load_config

    stage: StageSpec | None = getattr(args, "stage_spec", None)
    if stage is not None and stage.config_from_args is not None:
        cfg = stage.config_from_args(args)
        if cfg is not None:
            return cfg
    if args.config is None:
        raise ConfigError(f"vqpipe {args.command} needs a CONFIG file")
    return load_config(args.config, args.overrides)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "reconstruct":
        return _reconstruct(args)
    if args.command == "decode":
        return _decode(args)
    cfg = _load(args)
    if args.command == "validate":
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        if not args.no_memory:
            _print_memory_estimates(cfg)
        return 0
    if args.command == "status":
        from pipelines.status import format_status, pipeline_status

        print(format_status(pipeline_status(cfg)))
        return 0

    return _run_stages(args, cfg)


def _print_memory_estimates(cfg) -> None:
    """Each enabled training stage's estimated peak memory per worker, probed on this CPU."""
    from pipelines.sizing import estimate

    for spec in STAGES:
        if spec.memory_probes is None or not spec.enabled(cfg):
            continue
        for probe in spec.memory_probes(cfg):
            found = estimate(probe)
            print(
                f"{probe.section}: estimated peak memory per worker {found.describe()} "
                "(probed on this machine's CPU)",
                file=sys.stderr,
            )


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
            stage = args.stage_spec.name
            outcomes = run_stages(cfg, stages=[stage], force=[stage] if args.force else [])
        shown.run_finished()
    print(_summary(outcomes))
    return 0


def _runs_stages(args: argparse.Namespace) -> bool:
    return args.command == "run" or getattr(args, "stage_spec", None) is not None


def main(argv: list[str] | None = None) -> int:
    global _log_dir
    args = build_parser().parse_args(argv)
    _log_dir = None
    if not _runs_stages(args):  # a stage run routes its logs itself (pipelines.logs)
        logging.basicConfig(
            level=logging.WARNING if args.quiet else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
    try:
        return _dispatch(args)
    except Exception as err:
        mistake = user_error_in(err)  # the user's mistake, perhaps wrapped by Ray on its way here
        if mistake is not None:
            print(f"vqpipe: error: {mistake}", file=sys.stderr)
            _where_logs()
            return 2
        # A bug, not the user's mistake: show where it happened.
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
