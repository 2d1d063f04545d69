"""The same config and seed give the same codes and metrics, whatever else runs on the machine,
in its own process or in another."""

from __future__ import annotations

import numpy as np

from pipelines.data.shards import iter_code_samples
from tests.pipelines.conftest import SHARED_CLASSES, SHARED_PER_CLASS

# Figures that measure the machine rather than the models.
TIMINGS = ("seconds", "images_per_second", "evaluate/seconds")


def _codes(tokenized) -> dict[str, tuple]:
    return {
        s["key"]: (s["label"], s["top"].tobytes(), s["bottom"].tobytes())
        for s in iter_code_samples(shard.uri for shard in tokenized.shards)
    }


def _figures(manifests: dict) -> dict[str, float]:
    figures = {}
    figures |= {f"train_vqvae/{k}": v for k, v in manifests["train_vqvae"].metrics.items()}
    for level, entry in manifests["train_prior"].priors.items():
        figures[f"train_prior/{level}/validation"] = entry.validation_bits_per_code
        figures[f"train_prior/{level}/train"] = entry.train_bits_per_code
        figures[f"train_prior/{level}/selected_step"] = entry.selected_step
    figures |= {
        f"evaluate/{k}": v
        for k, v in manifests["evaluate"].metrics.items()
        if not k.endswith(TIMINGS)
    }
    return figures


def test_a_run_under_load_gives_the_same_codes_and_metrics(shared_run, shared_rerun):
    """The shared run (`vqpipe run` in its own process; its autoencoder on two DDP ranks: the
    per-rank reader and gradient averaging too), then the same config in another folder, in
    this process, while other work competes for the cores (``shared_rerun``)."""
    first = shared_run.manifests
    second = {stage: outcome.manifest for stage, outcome in shared_rerun.items()}

    codes = _codes(first["tokenize"])
    assert len(codes) == SHARED_PER_CLASS * len(SHARED_CLASSES)
    assert _codes(second["tokenize"]) == codes  # every key: label and both code maps
    assert first["tokenize"].splits == second["tokenize"].splits
    one, two = _figures(first), _figures(second)
    assert "evaluate/test/bits_per_code/top" in one and "evaluate/cas/generated_to_real" in one
    assert one.keys() == two.keys()
    for name, value in one.items():
        assert (np.isnan(value) and np.isnan(two[name])) or two[name] == value, name
