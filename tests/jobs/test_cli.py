"""The vqpipe CLI and the job entry points: verbs from the stage declarations, exit statuses."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import ClassVar

import pytest

from jobs import stage as stage_job
from jobs.cli import _load, build_parser, main
from pipelines.config import parse_config
from pipelines.manifest import StageManifest
from pipelines.stage import StageSpec
from pipelines.stages import STAGES


def test_every_declared_stage_is_a_command():
    parser = build_parser()
    for spec in STAGES:
        args = parser.parse_args([spec.verb, "config.yaml", "--force"])
        assert args.command == spec.verb and args.force


class _BlendManifest(StageManifest):
    stage: ClassVar[str] = "blend_codes"


def _blend_spec(tmp_path) -> StageSpec:
    """A stage of a test registry with an option of its own that makes its configuration."""

    def options(parser):
        parser.add_argument("--corpus", help="the corpus to blend")

    def config_from_args(args):
        return parse_config({"output_dir": str(tmp_path), "data": {"source": args.corpus}})

    return StageSpec(
        manifest=_BlendManifest,
        run=lambda ctx: _BlendManifest(),
        description="blend two code datasets",
        cli_options=options,
        config_from_args=config_from_args,
    )


def test_a_stages_options_and_configuration_come_from_its_declaration(tmp_path, capsys):
    spec = _blend_spec(tmp_path)
    parser = build_parser([spec])
    # No CONFIG: the stage makes its configuration from its own option.
    args = parser.parse_args(["blend-codes", "--corpus", "s3://birds"])
    assert args.stage_spec is spec and args.corpus == "s3://birds"
    assert _load(args).data.source == "s3://birds"
    with pytest.raises(SystemExit):
        parser.parse_args(["blend-codes", "--help"])
    assert "the corpus to blend" in capsys.readouterr().out

    # Without them a stage has no such option, and CONFIG is required.
    plain = StageSpec(manifest=_BlendManifest, run=spec.run, description="blend")
    for argv in (["blend-codes", "c.yaml", "--corpus", "x"], ["blend-codes"]):
        with pytest.raises(SystemExit) as exit_info:
            build_parser([plain]).parse_args(argv)
        assert exit_info.value.code == 2
    assert "--corpus" in capsys.readouterr().err


def test_the_registrys_stage_options_are_its_own(tmp_path, capsys):
    parser = build_parser()
    for spec in STAGES:
        if spec.cli_options is None:
            with pytest.raises(SystemExit):
                parser.parse_args([spec.verb, "c.yaml", "--checkpoint", "ckpt.pt"])
    # tokenize's options set their keys before --set, which has the last word.
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"output_dir": str(tmp_path), "data": {"source": "x"}}))
    corpus, other, checkpoint = (str(tmp_path / name) for name in ("corpus", "other", "ckpt.pt"))
    argv = ["tokenize", str(config), "--input", corpus, "--checkpoint", checkpoint]
    cfg = _load(parser.parse_args([*argv, "--set", f"data.source={other}"]))
    assert (cfg.data.source, cfg.tokenize.checkpoint) == (other, checkpoint)
    # Without CONFIG it names the options it misses.
    assert main(["tokenize", "--input", "corpus"]) == 2
    assert "(missing: --checkpoint, --output)" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("vqpipe ") and out.strip() != "vqpipe"


def test_a_users_mistake_exits_2_with_the_message_only(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"output_dir": str(tmp_path), "data": {"source": "x"}}))
    assert main(["validate", str(config), "--set", "train_vqvae.steps=-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vqpipe: error: invalid configuration")
    assert "train_vqvae.steps" in err and "Traceback" not in err


def test_an_internal_error_exits_1_with_its_traceback(tmp_path, capsys, monkeypatch):
    import pipelines.config

    def broken(*args, **kwargs):
        raise ValueError("an internal bug, not the user's mistake")

    monkeypatch.setattr(pipelines.config, "load_config", broken)
    assert main(["validate", str(tmp_path / "c.yaml")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "an internal bug" in err and "internal error" in err


def test_stage_entry_point_takes_a_name_or_a_verb(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"output_dir": str(tmp_path), "data": {"source": "x"}}))
    # An unknown stage is named, with the valid ones.
    assert stage_job.main(["train_vqvea", str(config)]) == 2
    err = capsys.readouterr().err
    assert "train_vqvea" in err and "train_vqvae" in err
    # A known one reaches the stage's command: the bad config key is reported by it.
    for name in ("train_prior", "train-prior"):
        assert stage_job.main([name, str(config), "--set", "train_prior.stepz=3"]) == 2
        assert "train_prior.stepz: unknown key" in capsys.readouterr().err


def test_cluster_entry_points_run_as_modules(tmp_path):
    for module in ("jobs.run_pipeline", "jobs.stage"):
        done = subprocess.run(
            [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120
        )
        assert done.returncode in (0, 2), done.stderr
        assert "usage" in (done.stdout + done.stderr).lower()
