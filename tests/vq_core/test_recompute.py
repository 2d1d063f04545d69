"""Activation checkpointing: the same loss and gradients as without it, less kept for backward,
and nothing changed in checkpoints or sampling."""

from __future__ import annotations

import copy

import pytest
import torch

from vq_core.dvae import DiscreteVAE, DiscreteVAEConfig
from vq_core.memory import saved_tensor_bytes
from vq_core.pixelcnn import GatedPixelCNN, GatedPixelCNNConfig
from vq_core.pixelsnail import PixelSNAIL, PixelSNAILConfig
from vq_core.recompute import set_activation_checkpointing
from vq_core.transformer import TransformerPrior, TransformerPriorConfig
from vq_core.vqvae import VQVAE, VQVAE2, VQVAE2Config, VQVAEConfig


def _images(n=2, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _codes(n, k, h, w, seed):
    return torch.randint(0, k, (n, h, w), generator=torch.Generator().manual_seed(seed))


PRIOR = dict(num_codes=16, height=8, width=8, channels=16, num_classes=3)
COND = dict(condition_num_codes=8, condition_height=4, condition_width=4, condition_channels=8)


def _autoencoder_case(model):
    x = _images()
    return model, lambda m: m(x).loss


def _prior_case(model, conditioned):
    codes, labels = _codes(2, 16, 8, 8, 2), torch.tensor([0, 2])
    condition = _codes(2, 8, 4, 4, 3) if conditioned else None
    return model, lambda m: m.loss(codes, labels, condition)


CASES = {
    "vqvae2": lambda: _autoencoder_case(
        VQVAE2(
            VQVAE2Config(
                channels=16,
                res_channels=8,
                embed_dim=8,
                codebook_size_top=16,
                codebook_size_bottom=16,
                data_init=False,
            )
        )
    ),
    # Codes at 1/16, 1/8 and 1/4: three encoders and three decoders recompute.
    "vqvae2-three-levels": lambda: _autoencoder_case(
        VQVAE2(
            VQVAE2Config(
                channels=16,
                res_channels=8,
                embed_dim=8,
                data_init=False,
                levels=[
                    {"name": "top", "downsample": 2, "codebook_size": 16},
                    {"name": "middle", "downsample": 2, "codebook_size": 16},
                    {"name": "bottom", "downsample": 4, "codebook_size": 16},
                ],
            )
        )
    ),
    "vqvae": lambda: _autoencoder_case(
        VQVAE(
            VQVAEConfig(channels=16, res_channels=8, embed_dim=8, codebook_size=16, data_init=False)
        )
    ),
    "dvae": lambda: _autoencoder_case(
        DiscreteVAE(DiscreteVAEConfig(channels=16, res_channels=8, codebook_size=16, embed_dim=8))
    ),
    # Dropout on: recomputation must replay the same masks.
    "pixelsnail": lambda: _prior_case(
        PixelSNAIL(
            PixelSNAILConfig(
                **PRIOR, num_blocks=2, res_blocks=1, num_heads=2, attention_channels=8, dropout=0.3
            )
        ),
        False,
    ),
    "pixelsnail-bottom": lambda: _prior_case(
        PixelSNAIL(
            PixelSNAILConfig(
                **PRIOR, **COND, num_blocks=1, res_blocks=2, attention=False, dropout=0.3
            )
        ),
        True,
    ),
    "pixelcnn": lambda: _prior_case(
        GatedPixelCNN(GatedPixelCNNConfig(**PRIOR, num_layers=3)), False
    ),
    "transformer-bottom": lambda: _prior_case(
        TransformerPrior(
            TransformerPriorConfig(**PRIOR, **COND, num_layers=2, num_heads=2, dropout=0.3)
        ),
        True,
    ),
}


def _loss_and_grads(model, loss_fn, seed=0):
    torch.manual_seed(seed)
    loss = loss_fn(model)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_loss_and_gradients_with_recomputation(name):
    torch.manual_seed(0)
    model, loss_fn = CASES[name]()
    model.train()
    # A copy, because a training forward pass moves the EMA codebooks of the autoencoders.
    twin = copy.deepcopy(model)
    loss, grads = _loss_and_grads(model, loss_fn)
    assert set_activation_checkpointing(twin, True) > 0
    loss_rc, grads_rc = _loss_and_grads(twin, loss_fn)
    assert torch.allclose(loss, loss_rc, rtol=1e-6, atol=1e-7)
    assert grads.keys() == grads_rc.keys() and grads
    for key in grads:
        assert torch.allclose(grads[key], grads_rc[key], rtol=1e-5, atol=1e-6), key


@pytest.mark.parametrize("name", sorted(CASES))
def test_recomputation_keeps_less_for_backward(name):
    torch.manual_seed(0)
    model, loss_fn = CASES[name]()
    model.train()
    plain = saved_tensor_bytes(lambda: loss_fn(model))
    set_activation_checkpointing(model, True)
    recomputed = saved_tensor_bytes(lambda: loss_fn(model))
    assert recomputed < 0.75 * plain, (plain, recomputed)


def test_switch_is_not_in_the_checkpoint_and_sampling_is_unchanged():
    torch.manual_seed(0)
    model = PixelSNAIL(
        PixelSNAILConfig(**PRIOR, num_blocks=1, res_blocks=1, num_heads=2, attention_channels=8)
    )
    keys = list(model.state_dict())
    labels = torch.tensor([1, 2])
    plain = model.eval().sample(2, labels, generator=torch.Generator().manual_seed(5))
    set_activation_checkpointing(model, True)
    assert list(model.state_dict()) == keys
    again = model.sample(2, labels, generator=torch.Generator().manual_seed(5))
    assert torch.equal(plain, again)


def test_nested_blocks_are_recomputed_once_and_the_switch_turns_off():
    model = PixelSNAIL(
        PixelSNAILConfig(**PRIOR, num_blocks=1, res_blocks=1, num_heads=2, attention_channels=8)
    )
    # One vertical and one horizontal residual block, and the attention block whose own
    # residual block is recomputed with it.
    assert set_activation_checkpointing(model, True) == 3
    assert model.blocks[0].attention.recompute and not model.blocks[0].attention.residual.recompute
    assert set_activation_checkpointing(model, False) == 0
    assert not any(getattr(m, "recompute", False) for m in model.modules())


def test_a_model_without_blocks_is_refused():
    with pytest.raises(ValueError, match="Linear has no blocks"):
        set_activation_checkpointing(torch.nn.Linear(2, 2), True)
