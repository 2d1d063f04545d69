"""DALL-E's discrete VAE (Ramesh et al., 2021): a categorical latent trained by Gumbel-softmax.

The encoder predicts K logits per latent position instead of a vector to quantise. Training
samples a relaxed one-hot from those logits (Gumbel-softmax), the decoder reads the matching soft
mixture of code embeddings, and a KL term to the uniform prior keeps the codebook spread out. At
inference the argmax code is taken, so the model tokenizes exactly like a VQ model and shares
their interface (levels, codebook_sizes, downsample, code_shape, encode, decode_codes).

The paper anneals the relaxation temperature from 1 to 1/16 and ramps the KL weight up early in
training, both along cosine curves; `gumbel_temperature` and `kl_weight_schedule` give those
schedules as functions of the step, and forward() takes both values as arguments so a training
loop can pass them in. The paper's step counts (150,000 and 5,000 of 3 million) mean nothing for
a run of a thousand steps: `dvae_schedule` expresses both as fractions of the run's length, so a
short run anneals fully.

The KL weight. The paper minimises a sum over pixel values of the reconstruction NLL plus beta
(6.6) times a sum over latent positions of the KL. This model averages both terms instead (per
value and per position), which divides the first by C x H x W and the second by
(H / f) x (W / f); the same balance therefore needs kl_weight = beta / (C f^2)
(`scaled_kl_weight`): 6.6 / 192 = 0.034 for RGB at f = 8, 6.6 / 48 = 0.1375 at f = 4. The
config's default is that value, worked out from in_channels and downsample. The old default,
1e-3, was 30-140 times smaller: the KL did nothing and the codebook collapsed to a few codes.

Reconstruction is scored as in the paper by the logit-Laplace likelihood: pixels p in [0, 1] are
first squeezed into [eps, 1 - eps] (eps = 0.1), because the density lives on the open interval
(0, 1) and its log-Jacobian 1 / (p (1 - p)) would otherwise reward pushing every pixel to 0 or 1.
The decoder then predicts, per pixel and channel, a location mu and a log-scale of a Laplace
distribution over logit(p). The images the model takes and returns stay in [-1, 1] like every
other vq_core autoencoder; the conversion happens inside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vq_core.quantizer import code_statistics
from vq_core.vqvae import (
    AutoencoderOutput,
    Decoder,
    Encoder,
    VQVAEConfig,
    check_codebook_size,
    check_codes,
    check_image_size,
    check_images,
    check_network_fields,
    init_conv_weights,
    reconstruction_loss,
)

# -------------------------------------------------------------------------------------------------
# Schedules (pure functions of the optimisation step)


TEMPERATURE_SHAPES = ("cosine", "geometric")


def gumbel_temperature(
    step: int,
    *,
    start: float = 1.0,
    end: float = 1.0 / 16,
    anneal_steps: int = 150_000,
    shape: str = "cosine",
) -> float:
    """Relaxation temperature at `step`: annealed from `start` to `end`, then constant.

    "cosine" (the paper's): half a cosine period from start to end, flat at both ends.
    "geometric": each halving of the temperature takes the same number of steps. DALL-E anneals
    from 1 to 1/16 over its first 150,000 updates (of 3 million).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if anneal_steps <= 0:
        raise ValueError(f"anneal_steps must be > 0, got {anneal_steps}")
    if start <= 0 or end <= 0:
        raise ValueError(f"temperatures must be > 0, got start={start}, end={end}")
    if shape not in TEMPERATURE_SHAPES:
        raise ValueError(f"shape must be one of {TEMPERATURE_SHAPES}, got {shape!r}")
    progress = min(step / anneal_steps, 1.0)
    if shape == "geometric":
        return start * (end / start) ** progress
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def kl_weight_schedule(step: int, *, final: float, warmup_steps: int = 5000) -> float:
    """KL weight at `step`: a half-cosine ramp from 0 to `final` over `warmup_steps`, then flat.

    The paper's ramp: 0 to 6.6 over the first 5,000 of 3 million updates. Starting at 0 lets the encoder first learn to use its codes for reconstruction; a strong
    pull toward the uniform prior from step 0 tends to leave the logits uninformative.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if final < 0:
        raise ValueError(f"final KL weight must be >= 0, got {final}")
    if warmup_steps == 0 or step >= warmup_steps:
        return final
    return final * 0.5 * (1.0 - math.cos(math.pi * step / warmup_steps))


def dvae_schedule(
    step: int,
    total_steps: int,
    *,
    kl_weight: float,
    temperature_start: float = 1.0,
    temperature_end: float = 1.0 / 16,
    anneal_fraction: float = 1.0,
    warmup_fraction: float = 0.1,
) -> tuple[float, float]:
    """(Gumbel temperature, KL weight) at `step` of a run of `total_steps`.

    The temperature reaches `temperature_end` after `anneal_fraction` of the run, the KL weight
    reaches `kl_weight` after `warmup_fraction` of it (0: from the first step). The paper's
    proportions are 0.05 and 0.0017 of 3 million steps; in runs of a few thousand steps those
    leave the KL ramp a handful of steps and the temperature at 1/16 for 95% of the run, which
    measured no better, so the defaults spread the anneal over the whole run and ramp the KL over
    its first tenth.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    for name, fraction in (
        ("anneal_fraction", anneal_fraction),
        ("warmup_fraction", warmup_fraction),
    ):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {fraction}")
    anneal_steps = max(1, round(anneal_fraction * total_steps))
    warmup_steps = round(warmup_fraction * total_steps)
    temperature = gumbel_temperature(
        step, start=temperature_start, end=temperature_end, anneal_steps=anneal_steps
    )
    return temperature, kl_weight_schedule(step, final=kl_weight, warmup_steps=warmup_steps)


# The paper's KL weight, for a KL summed over positions against a NLL summed over pixel values.
PAPER_KL_BETA = 6.6


def scaled_kl_weight(in_channels: int, downsample: int, beta: float = PAPER_KL_BETA) -> float:
    """The weight of the per-position mean KL that matches `beta` on summed terms, when the
    reconstruction term is a mean per pixel value: beta x positions / values = beta / (C f^2)."""
    return beta / (in_channels * downsample**2)


# -------------------------------------------------------------------------------------------------
# Model


RECONSTRUCTIONS = ("logit_laplace", "mse")

# The paper's margin: pixels are mapped from [0, 1] into [eps, 1 - eps] before the likelihood.
LOGIT_LAPLACE_EPS = 0.1


@dataclass
class DiscreteVAEConfig:
    """dVAE hyper-parameters. temperature and kl_weight are the defaults used by forward().

    reconstruction: "logit_laplace" (the paper's likelihood; the decoder predicts a location and a
    log-scale per channel) or "mse" (squared error on the [-1, 1] images; one output per channel).
    hard: straight-through Gumbel samples in training: the decoder reads the one-hot of the
    perturbed argmax, gradients flow through the relaxed sample.
    """

    # The encoder and decoder are the VQ-VAE's (vq_core.vqvae), with its defaults.
    in_channels: int = VQVAEConfig.in_channels
    channels: int = VQVAEConfig.channels
    res_blocks: int = VQVAEConfig.res_blocks
    res_channels: int = VQVAEConfig.res_channels
    embed_dim: int = VQVAEConfig.embed_dim
    codebook_size: int = 8192
    downsample: int = 8
    temperature: float = 1.0
    # None: the paper's beta (6.6) scaled to these per-value and per-position means,
    # scaled_kl_weight(in_channels, downsample); filled in by __post_init__, so a saved config
    # holds the number it trained with.
    kl_weight: float | None = None
    reconstruction: str = "logit_laplace"
    hard: bool = False

    # Values of fields that checkpoints written before the field existed implied: those models
    # were trained with the MSE decoder (one output per channel) and soft samples.
    stored_defaults: ClassVar[dict[str, object]] = {"reconstruction": "mse", "hard": False}

    def __post_init__(self) -> None:
        check_network_fields(self)
        check_codebook_size("codebook_size", self.codebook_size)
        if self.downsample not in (4, 8):
            raise ValueError(f"downsample must be 4 or 8, got {self.downsample!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.kl_weight is None:
            self.kl_weight = scaled_kl_weight(self.in_channels, self.downsample)
        if not isinstance(self.kl_weight, (int, float)) or self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight!r}")
        if self.reconstruction not in RECONSTRUCTIONS:
            raise ValueError(
                f"reconstruction must be one of {RECONSTRUCTIONS}, got {self.reconstruction!r}"
            )
        if not isinstance(self.hard, bool):
            raise ValueError(f"hard must be True or False, got {self.hard!r}")


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(q || uniform) in nats, for logits B x K x h x w.

    KL(q || U) = sum_k q_k log q_k + log K = log K - H(q): the gap between q's entropy and the
    largest possible one.
    """
    log_q = F.log_softmax(logits.float(), dim=1)
    num_codes = logits.shape[1]
    return (log_q.exp() * log_q).sum(dim=1).mean() + math.log(num_codes)


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """Pixels in [0, 1] -> [eps, 1 - eps], where the logit-Laplace density is bounded."""
    return (1.0 - 2.0 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """Inverse of map_pixels, clipped to [0, 1]: values outside [eps, 1 - eps] have no preimage."""
    return ((x - eps) / (1.0 - 2.0 * eps)).clamp(0.0, 1.0)


def logit_laplace_nll(
    x: torch.Tensor, location: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """Mean negative log-density (nats per value) of x in (0, 1) under the logit-Laplace
    distribution: logit(x) ~ Laplace(location, exp(log_scale)).

    density(x) = exp(-|logit(x) - mu| / b) / (2 b x (1 - x)); the x (1 - x) factor is the
    Jacobian of the logit.
    """
    x, location, log_scale = x.float(), location.float(), log_scale.float()
    distance = (torch.logit(x) - location).abs()
    nll = distance * torch.exp(-log_scale) + log_scale + math.log(2.0)
    return (nll + torch.log(x) + torch.log1p(-x)).mean()


class DiscreteVAE(nn.Module):
    """Encoder -> K logits per position -> (relaxed) one-hot -> code embeddings -> decoder."""

    config_class = DiscreteVAEConfig
    levels: tuple[str, ...] = ("codes",)

    def __init__(self, config: DiscreteVAEConfig):
        super().__init__()
        if not isinstance(config, DiscreteVAEConfig):
            raise TypeError(f"DiscreteVAE expects a DiscreteVAEConfig, got {type(config).__name__}")
        self.config = config
        c = config
        self.encoder = Encoder(
            c.in_channels, c.channels, c.res_blocks, c.res_channels, c.downsample
        )
        self.to_logits = nn.Conv2d(c.channels, c.codebook_size, 1)
        self.codebook = nn.Embedding(c.codebook_size, c.embed_dim)
        # The logit-Laplace decoder predicts a location and a log-scale for each image channel.
        out_channels = 2 * c.in_channels if c.reconstruction == "logit_laplace" else c.in_channels
        self.decoder = Decoder(
            c.embed_dim, out_channels, c.channels, c.res_blocks, c.res_channels, c.downsample
        )
        # The logits keep PyTorch's milder default init: starting close to uniform over the
        # codes lets every code receive gradient early on.
        init_conv_weights(self.encoder)
        init_conv_weights(self.decoder)

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return (self.config.codebook_size,)

    @property
    def downsample(self) -> tuple[int, ...]:
        return (self.config.downsample,)

    def code_shape(self, height: int, width: int) -> tuple[tuple[int, int], ...]:
        f = self.config.downsample
        check_image_size(height, width, f)
        return ((height // f, width // f),)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """B x K x h x w code logits of images x."""
        check_images(x, self.config.in_channels, self.config.downsample)
        return self.to_logits(self.encoder(x))

    def _embed(self, weights: torch.Tensor) -> torch.Tensor:
        # weights: B x K x h x w (one-hot or relaxed) -> B x D x h x w mixture of code vectors.
        return torch.einsum("bkhw,kd->bdhw", weights, self.codebook.weight.to(weights.dtype))

    def _image(self, decoded: torch.Tensor) -> torch.Tensor:
        # The decoder's output -> the reconstruction in [-1, 1]: for logit-Laplace the location
        # squashed back to a pixel, the distribution's median.
        if self.config.reconstruction == "mse":
            return decoded
        location = decoded[:, : self.config.in_channels].float()
        return (unmap_pixels(torch.sigmoid(location)) * 2.0 - 1.0).to(decoded.dtype)

    def _reconstruction_loss(self, decoded: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.config.reconstruction == "mse":
            return reconstruction_loss(decoded, x)
        c = self.config.in_channels
        target = map_pixels((x.float().clamp(-1.0, 1.0) + 1.0) / 2.0)
        return logit_laplace_nll(target, decoded[:, :c], decoded[:, c:])

    def forward(
        self,
        x: torch.Tensor,
        temperature: float | None = None,
        kl_weight: float | None = None,
    ) -> AutoencoderOutput:
        """Training mode samples a Gumbel-softmax relaxation; eval mode uses the argmax codes,
        so an evaluated reconstruction equals decode_codes(encode(x))."""
        temperature = self.config.temperature if temperature is None else temperature
        kl_weight = self.config.kl_weight if kl_weight is None else kl_weight
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        logits = self.logits(x).float()  # softmax and Gumbel noise in float32 under autocast
        codes = logits.argmax(dim=1)
        if self.training:
            # hard: one-hot of argmax(logits + Gumbel noise) forward, the relaxed sample's
            # gradient backward (straight-through).
            weights = F.gumbel_softmax(logits, tau=temperature, hard=self.config.hard, dim=1)
        else:
            weights = F.one_hot(codes, self.config.codebook_size).permute(0, 3, 1, 2).float()
        decoded = self.decoder(self._embed(weights))
        reconstruction = self._image(decoded)

        terms = {
            "reconstruction": self._reconstruction_loss(decoded, x),
            "kl": kl_to_uniform(logits),
        }
        perplexity, usage = code_statistics(codes.detach(), self.config.codebook_size)
        stats = {"perplexity/codes": perplexity, "usage/codes": usage}
        loss = terms["reconstruction"] + kl_weight * terms["kl"]
        return AutoencoderOutput(reconstruction, loss, terms, stats)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.inference_mode():
            codes = self.logits(x).argmax(dim=1)
        # Ordinary tensor, not an inference tensor, so it can feed a prior's training directly.
        return (codes.clone(),)

    @torch.no_grad()
    def decode_codes(self, codes: tuple[torch.Tensor, ...]) -> torch.Tensor:
        check_codes(codes, self.levels, self.codebook_sizes)
        return self._image(self.decoder(self.codebook(codes[0]).permute(0, 3, 1, 2)))
