"""The CUDA paths: device placement, bf16 autocast, CUDA generators, GPU actors and workers.

Marked ``gpu``: the default run skips them (``-m 'not slow and not gpu'`` in pyproject.toml);
``pytest -m gpu`` collects them, and they skip themselves where no CUDA device is visible.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vq_core.kinds import KINDS, autoencoder_fields, kinds_of, prior_fields

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")
K = 16  # every codebook of these tiny models

# The smallest model of each kind; priors over a 4x4 map conditioned on a 2x2 one, 3 classes.
AUTOENCODER_PARAMS = {
    "vqvae2": {
        "channels": 16,
        "res_blocks": 1,
        "res_channels": 8,
        "embed_dim": 8,
        "codebook_size_top": K,
        "codebook_size_bottom": K,
    },
    "vqvae": {
        "channels": 16,
        "res_blocks": 1,
        "res_channels": 8,
        "embed_dim": 8,
        "codebook_size": K,
    },
    "dvae": {
        "channels": 16,
        "res_blocks": 1,
        "res_channels": 8,
        "embed_dim": 8,
        "codebook_size": K,
        "downsample": 4,
    },
}
PRIOR_PARAMS = {
    "pixelsnail": {"channels": 16, "num_blocks": 1, "res_blocks": 1, "num_heads": 2},
    "pixelcnn": {"channels": 16},
    "transformer": {"channels": 16, "num_layers": 1, "num_heads": 2},
}


def _autoencoder(kind: str) -> torch.nn.Module:
    return KINDS[kind].build(AUTOENCODER_PARAMS[kind], autoencoder_fields(3)).to(CUDA)


def _prior(kind: str) -> torch.nn.Module:
    fields = prior_fields(K, (4, 4), 3, condition=(K, (2, 2)))
    return KINDS[kind].build(PRIOR_PARAMS[kind], fields).to(CUDA)


def _on_cuda(module: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``module`` that are not on the GPU."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return [name for name, t in tensors if t.device.type != "cuda"]


def test_kinds_cover_every_model():
    assert set(AUTOENCODER_PARAMS) == set(kinds_of("autoencoder"))
    assert set(PRIOR_PARAMS) == set(kinds_of("prior"))


@pytest.mark.parametrize("kind", sorted(AUTOENCODER_PARAMS))
def test_autoencoder_and_quantizer_state_live_on_the_gpu(kind):
    model = _autoencoder(kind).train()
    assert _on_cuda(model) == []
    x = torch.rand(4, 3, 16, 16, device=CUDA) * 2 - 1
    out = model(x)
    out.loss.backward()
    assert out.reconstruction.device.type == "cuda" and torch.isfinite(out.loss)
    # A training step updates the quantizers' EMA state in place: it must stay on the GPU.
    assert _on_cuda(model) == []
    codes = model.eval().encode(x)
    assert all(c.device.type == "cuda" and c.dtype == torch.long for c in codes)
    assert model.decode_codes(codes).shape == x.shape


@pytest.mark.parametrize("kind", sorted(PRIOR_PARAMS))
def test_prior_samples_on_the_gpu_with_a_cuda_generator(kind):
    prior = _prior(kind)
    assert _on_cuda(prior) == []
    labels = torch.tensor([0, 1], device=CUDA)
    condition = torch.randint(0, K, (2, 2, 2), device=CUDA)

    def draw(method: str, seed: int) -> torch.Tensor:
        generator = torch.Generator(device=CUDA).manual_seed(seed)
        return prior.sample(2, labels, condition, generator=generator, method=method)

    cached = draw("cached", 0)
    assert cached.device.type == "cuda" and cached.shape == (2, 4, 4)
    assert torch.equal(cached, draw("cached", 0)), "the same CUDA generator seed repeats"
    assert torch.equal(cached, draw("naive", 0)), "cached sampling stays exact on the GPU"


def test_bf16_autocast_keeps_the_priors_stream_in_bf16():
    prior = _prior("pixelsnail").train()
    codes = torch.randint(0, K, (2, 4, 4), device=CUDA)
    labels = torch.tensor([0, 2], device=CUDA)
    condition = torch.randint(0, K, (2, 2, 2), device=CUDA)
    dtypes = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
        for m in prior.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = prior.loss(codes, labels, condition)
    for hook in hooks:
        hook.remove()
    loss.backward()
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in prior.parameters())


# ----------------------------------------------------------------- the stages on a GPU


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    """train_vqvae on one GPU worker in bf16, then tokenize on a GPU actor, through the runner."""
    import ray

    from pipelines.config import parse_config
    from pipelines.runner import run_stages
    from tests.pipelines.conftest import tiny_raw_config

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    root = tmp_path_factory.mktemp("gpu")
    raw = tiny_raw_config(str(root / "out"), str(root / "corpus"))
    raw["data"]["generate"] = {
        "images_per_class": 6,
        "classes": ["circle", "square"],
        "image_size": 16,
    }
    raw["train_vqvae"] |= {"use_gpu": True, "precision": "bf16"}
    raw["tokenize"] |= {"gpus_per_actor": 1}
    cfg = parse_config(raw)
    outcomes = run_stages(cfg, stages=["train_vqvae", "tokenize"], run_name="gpu")
    return cfg, outcomes


def test_training_on_a_gpu_worker_in_bf16_logs_its_memory_estimate(gpu_run):
    import os

    from mlflow.tracking import MlflowClient

    cfg, outcomes = gpu_run
    manifest = outcomes["train_vqvae"].manifest
    client = MlflowClient(tracking_uri="sqlite:///" + os.path.join(cfg.output_dir, "mlflow.db"))
    run = client.get_run(manifest.mlflow_run_id)
    assert run.data.params["train_vqvae.precision"] == "bf16"
    assert run.data.params["train_vqvae.use_gpu"] == "True"
    # The estimate was probed on the GPU worker (the CUDA allocator's peak), so it is positive.
    assert run.data.metrics["memory/train_vqvae/estimated_peak_gib"] > 0
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert losses and all(np.isfinite(losses))
    assert manifest.steps == cfg.train_vqvae.steps


def test_a_batch_over_the_gpu_fails_before_training(tmp_path):
    """The preflight on the GPU worker stops a stage whose batch cannot fit, naming the keys."""
    from pipelines.config import parse_config
    from pipelines.errors import MemoryBudgetError
    from pipelines.runner import run_stages
    from tests.pipelines.conftest import tiny_raw_config

    raw = tiny_raw_config(str(tmp_path / "out"), str(tmp_path / "corpus"))
    raw["data"]["generate"] = {
        "images_per_class": 2,
        "classes": ["circle", "square"],
        "image_size": 16,
    }
    # The paper's autoencoder at 256 px needs about 25 MiB per image: 10 million images do not fit.
    raw["data"]["image_size"] = 256
    raw["train_vqvae"] |= {"use_gpu": True, "batch_size": 10_000_000}
    raw["train_vqvae"]["model"] |= {"channels": 128}
    with pytest.raises(MemoryBudgetError, match="train_vqvae.batch_size"):
        run_stages(parse_config(raw), stages=["train_vqvae"], run_name="too-big")
    assert not (tmp_path / "out" / "train_vqvae" / "manifest.json").exists()


def test_tokenize_on_a_gpu_actor_writes_the_codes_a_cpu_actor_writes(gpu_run, tmp_path):
    """The same checkpoint pinned on a CPU actor gives the same codes (up to exact ties)."""
    from pipelines.config import parse_config
    from pipelines.data.shards import iter_code_samples
    from pipelines.runner import run_stages
    from tests.pipelines.conftest import tiny_raw_config

    cfg, outcomes = gpu_run
    gpu_tok = outcomes["tokenize"].manifest
    raw = tiny_raw_config(str(tmp_path / "cpu"), cfg.data.source)
    raw["tokenize"] |= {"checkpoint": outcomes["train_vqvae"].manifest.checkpoint}
    cpu_tok = run_stages(parse_config(raw), stages=["tokenize"], run_name="cpu")[
        "tokenize"
    ].manifest
    assert gpu_tok.samples == cpu_tok.samples == 12

    def codes(manifest) -> dict[str, dict]:
        return {s["key"]: s for s in iter_code_samples(sh.uri for sh in manifest.shards)}

    on_gpu, on_cpu = codes(gpu_tok), codes(cpu_tok)
    assert on_gpu.keys() == on_cpu.keys()
    agree = total = 0
    for key, sample in on_gpu.items():
        for level in gpu_tok.code_shapes:
            agree += int((sample[level] == on_cpu[key][level]).sum())
            total += sample[level].size
    # GPU and CPU convolutions differ in the last bits: a vector at an exact tie may flip code.
    assert agree / total > 0.99
