"""The memory estimate of the training stages: what validate prints, what a run logs, and the
error that stops a stage whose workers would not fit their GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipelines.config import PriorSection, parse_config
from pipelines.errors import MemoryBudgetError
from pipelines.sizing import HEADROOM, check_budget, estimate
from pipelines.stages import train_prior, train_vqvae
from tests.pipelines.conftest import tiny_raw_config
from vq_core.memory import GIB


def _config(tmp_path, **prior):
    raw = tiny_raw_config(str(tmp_path / "out"), str(tmp_path / "corpus"))
    raw["data"]["generate"] = {"images_per_class": 2, "classes": ["a", "b"], "image_size": 16}
    raw["train_prior"]["bottom"] |= prior
    return parse_config(raw)


def test_each_training_stage_declares_its_probes(tmp_path):
    cfg = _config(tmp_path)
    assert [p.section for p in train_vqvae.memory_probes(cfg)] == ["train_vqvae"]
    probes = train_prior.memory_probes(cfg)
    assert [p.section for p in probes] == ["train_prior.top", "train_prior.bottom"]
    # The probe builds the model its workers train: the bottom prior reads the top codes.
    bottom = probes[1].build()
    assert bottom.config.condition_num_codes == 16 and bottom.config.height == 4
    batch = probes[1].make_batch(3)
    assert batch["bottom"].shape == (3, 4, 4) and batch["top"].shape == (3, 2, 2)


def test_checkpointing_and_a_smaller_batch_lower_the_estimate(tmp_path):
    base = train_prior.memory_probes(_config(tmp_path, batch_size=64))[1]
    lower = train_prior.memory_probes(
        _config(tmp_path, batch_size=16, accumulate_steps=4, activation_checkpointing=True)
    )[1]
    plain, reduced = estimate(base), estimate(lower)
    assert plain.batch_size == 64 and reduced.batch_size == 16
    assert reduced.per_sample_bytes < plain.per_sample_bytes
    assert reduced.peak_bytes < plain.peak_bytes


def test_a_stage_over_its_gpu_memory_fails_with_the_keys_that_lower_it(tmp_path):
    probe = train_prior.memory_probes(_config(tmp_path, batch_size=64))[1]
    found = estimate(probe)
    roomy = int(found.peak_bytes / HEADROOM) + 1
    check_budget(probe.section, probe.knobs, found, roomy, "GPU")  # fits: no error
    with pytest.raises(MemoryBudgetError) as err:
        check_budget(probe.section, probe.knobs, found, roomy // 2, "NVIDIA H100")
    message = str(err.value)
    assert message.startswith("train_prior.bottom needs about")
    assert f"{roomy // 2 / GIB:.1f} GiB of its GPU (NVIDIA H100)" in message
    for key in (
        "train_prior.bottom.batch_size",
        "accumulate_steps",
        "train_prior.bottom.activation_checkpointing: true",
        "train_prior.bottom.precision: bf16",
    ):
        assert key in message
    done = PriorSection(activation_checkpointing=True, precision="bf16")
    with pytest.raises(MemoryBudgetError) as err:
        check_budget("train_prior.bottom", done, found, 1, "GPU")
    remedies = str(err.value).split("lower it with ")[1]
    assert "activation_checkpointing" not in remedies and "bf16" not in remedies
    assert remedies.startswith("train_prior.bottom.batch_size (now 32;")


def test_validate_prints_each_estimate(tmp_path):
    cfg_file = tmp_path / "cfg.yaml"
    import yaml

    raw = tiny_raw_config(str(tmp_path / "out"), str(tmp_path / "corpus"))
    cfg_file.write_text(yaml.safe_dump(raw))
    done = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "validate", str(cfg_file)],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = [line for line in done.stderr.splitlines() if "estimated peak memory" in line]
    assert [line.split(":")[0] for line in lines] == [
        "train_vqvae",
        "train_prior.top",
        "train_prior.bottom",
    ]
    assert '"train_vqvae"' in done.stdout  # the config itself, on stdout as before
