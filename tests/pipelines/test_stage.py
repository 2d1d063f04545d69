"""Stage declarations: the registry, and the config view that keeps declarations honest."""

from __future__ import annotations

import pytest

from pipelines.config import parse_config
from pipelines.manifest import StageManifest
from pipelines.stage import ConfigView
from pipelines.stages import STAGES, get_stage, stage_names
from tests.pipelines.conftest import tiny_raw_config


def test_registry_is_ordered_so_upstream_stages_come_first():
    seen: set[str] = set()
    for spec in STAGES:
        assert issubclass(spec.manifest, StageManifest)
        assert set(spec.upstream_names) <= seen, spec.name
        seen.add(spec.name)
    assert len(set(stage_names())) == len(STAGES)


def test_the_registry_names_each_stage_after_its_module():
    """``stage_names()`` is read without importing the stage modules, from the module names."""
    assert stage_names() == tuple(spec.name for spec in STAGES)
    assert [spec.run.__module__ for spec in STAGES] == [
        f"pipelines.stages.{name}" for name in stage_names()
    ]


def test_importing_one_stage_imports_no_other(tmp_path):
    """A Ray worker that unpickles one stage's function imports that stage alone: not the
    others, nor the report's plotting library."""
    import subprocess
    import sys

    probe = (
        "import sys, pipelines.stages.train_prior as m\n"
        "print(sorted(n for n in sys.modules if n.startswith(('pipelines.stages.', 'matplotlib'))"
        " and n != m.__name__))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_each_stage_reads_its_own_section_and_declared_ones_exist():
    cfg = parse_config(tiny_raw_config("/tmp/out", "/tmp/corpus"))
    for spec in STAGES:
        assert spec.name in spec.reads
        for section in spec.reads:
            assert section in type(cfg).model_fields, (spec.name, section)
        assert get_stage(spec.verb) is spec and get_stage(spec.name) is spec


def test_config_view_refuses_undeclared_sections_and_records_reads():
    cfg = parse_config(tiny_raw_config("/tmp/out", "/tmp/corpus"))
    view = ConfigView(cfg, "sample", ("sample",))
    assert view.sample.per_class == cfg.sample.per_class
    assert view.output_dir == cfg.output_dir and view.ray == cfg.ray  # infrastructure
    with pytest.raises(RuntimeError, match="'data'.*does not declare"):
        view.data  # noqa: B018
    assert view.read == {"sample"}
    with pytest.raises(AttributeError):
        view.seed = 3


def test_status_of_an_interrupted_first_stage(tmp_path):
    from pipelines.runner import FINGERPRINT_FILE
    from pipelines.status import format_status, pipeline_status

    cfg = parse_config(tiny_raw_config(str(tmp_path / "out"), str(tmp_path / "corpus")))
    stage_dir = tmp_path / "out" / "train_vqvae"
    checkpoint = stage_dir / "ray" / "run" / "step-00000200"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.pt").write_bytes(b"weights")
    (stage_dir / FINGERPRINT_FILE).write_text("abc")
    statuses = pipeline_status(cfg)
    assert [(s.stage, s.state) for s in statuses] == [
        ("train_vqvae", "partial"),
        ("tokenize", "not started"),
        ("train_prior", "not started"),
        ("sample", "not started"),
        ("evaluate", "not started"),
    ]
    assert statuses[0].detail == "1 file(s) written, last checkpoint at step 200"
    assert "train_vqvae  partial" in format_status(statuses)


def test_status_of_an_interrupted_tokenize_counts_complete_shards_only(tmp_path):
    """The shard count comes from the shard format's own test of a name: key indexes and a
    killed writer's temporary file lie beside the shards but are not shards."""
    import numpy as np

    from pipelines.data import storage
    from pipelines.data.shards import write_shard
    from pipelines.runner import FINGERPRINT_FILE
    from pipelines.status import pipeline_status

    cfg = parse_config(tiny_raw_config(str(tmp_path / "out"), str(tmp_path / "corpus")))
    stage_dir = tmp_path / "out" / "tokenize"
    stage_dir.mkdir(parents=True)
    for keys in (["a/1", "a/2"], ["b/1"]):
        write_shard(
            str(stage_dir), keys, [0] * len(keys), {"top": np.zeros((len(keys), 2, 2), np.uint8)}
        )
    (stage_dir / f"codes-0123456789ab.tar.5e6f7a8b{storage.TMP_SUFFIX}").write_bytes(b"half")
    (stage_dir / FINGERPRINT_FILE).write_text("abc")
    tokenize = {s.stage: s for s in pipeline_status(cfg)}["tokenize"]
    assert tokenize.state == "partial"
    assert tokenize.detail == "5 file(s) written, 2 shard(s)"
