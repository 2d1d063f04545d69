"""VQ-VAE (one level) and VQ-VAE-2 (a hierarchy of levels, two by default) autoencoders.

Both models share the same small vocabulary of blocks: an Encoder made of stride-2 4x4 convs and a
residual stack, a Decoder that mirrors it with transposed convs, and one VectorQuantizer per level.
They also share one interface, which the tokenizer, the priors and the checkpoint module rely on:

    model.levels            names of the code maps, coarsest first
    model.codebook_sizes    K for each level
    model.downsample        image size / code-map size for each level
    model.code_shape(h, w)  (h', w') of each code map for an h x w image
    model(x)                AutoencoderOutput (training and evaluation)
    model.encode(x)         tuple of B x h' x w' long code maps, no autograd, no state change
    model.decode_codes(c)   images from a tuple of code maps

Layer names are part of the checkpoint format: renaming an attribute breaks old checkpoints.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vq_core.quantizer import (
    CODEBOOK_UPDATE,
    COMMITMENT_BETA,
    EMA_DECAY,
    QuantizerOutput,
    VectorQuantizer,
)
from vq_core.recompute import Recomputable, recomputed

# Codes are written to disk as uint16 (see model notes, section 5), hence the upper bound.
MAX_CODEBOOK_SIZE = 65536

# VQVAE2Config's codebook sizes when neither codebook_size_top/bottom nor levels set them.
DEFAULT_CODEBOOK_SIZE = 512


# -------------------------------------------------------------------------------------------------
# Config validation helpers, shared by every autoencoder config in vq_core


def check_positive_int(name: str, value: object, minimum: int = 1) -> None:
    # bool is a subclass of int; True as a channel count is always a mistake.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_codebook_size(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= MAX_CODEBOOK_SIZE:
        raise ValueError(
            f"{name} must be an integer in [2, {MAX_CODEBOOK_SIZE}] (codes are stored as uint16), "
            f"got {value!r}"
        )


def is_power_of_two(value: object) -> bool:
    """Whether value is one of the ints 2, 4, 8, ... (a resampling factor of stride-2 layers)."""
    # bool is an int, but True and False are below 2.
    return isinstance(value, int) and value >= 2 and not value & (value - 1)


def check_quantizer_fields(config: VQVAEConfig | VQVAE2Config) -> None:
    if not isinstance(config.beta, (int, float)) or config.beta < 0:
        raise ValueError(f"beta must be a number >= 0, got {config.beta!r}")
    if config.codebook_update not in ("ema", "loss"):
        raise ValueError(f"codebook_update must be 'ema' or 'loss', got {config.codebook_update!r}")
    if not isinstance(config.decay, (int, float)) or not 0.0 < config.decay < 1.0:
        raise ValueError(f"decay must be in (0, 1), got {config.decay!r}")
    if not isinstance(config.data_init, bool):
        raise ValueError(f"data_init must be True or False, got {config.data_init!r}")
    if not isinstance(config.dead_code_threshold, (int, float)) or config.dead_code_threshold < 0:
        raise ValueError(f"dead_code_threshold must be >= 0, got {config.dead_code_threshold!r}")


def check_network_fields(config: Any) -> None:
    """Checks the encoder/decoder fields that every autoencoder config shares."""
    check_positive_int("in_channels", config.in_channels)
    # The first downsampling conv produces channels // 2 feature maps.
    check_positive_int("channels", config.channels, minimum=2)
    if config.channels % 2:
        raise ValueError(f"channels must be even, got {config.channels}")
    check_positive_int("res_blocks", config.res_blocks, minimum=0)
    check_positive_int("res_channels", config.res_channels)
    check_positive_int("embed_dim", config.embed_dim)


# -------------------------------------------------------------------------------------------------
# Configs and outputs


@dataclass
class VQVAEConfig:
    """One-level VQ-VAE: codes at 1/4 of the image resolution."""

    in_channels: int = 3
    channels: int = 128
    res_blocks: int = 2
    res_channels: int = 32
    embed_dim: int = 64
    codebook_size: int = 512
    beta: float = COMMITMENT_BETA
    codebook_update: str = CODEBOOK_UPDATE
    decay: float = EMA_DECAY
    data_init: bool = True
    # Restart codes whose average assignments per batch fall below this. A code restarted or
    # initialised from data starts at one per batch, so with decay 0.99 an unused code is
    # re-seeded after about 230 steps; a much higher value would churn codes that are merely
    # rare when batches hold fewer vectors than the codebook has codes.
    dead_code_threshold: float = 0.1

    def __post_init__(self) -> None:
        check_network_fields(self)
        check_codebook_size("codebook_size", self.codebook_size)
        check_quantizer_fields(self)


@dataclass(frozen=True)
class LevelSpec:
    """One level of a VQ-VAE-2 hierarchy.

    downsample is the level's resolution factor relative to the level below it (for the bottom
    level, relative to the image): levels top, bottom with factors 2, 4 give codes at 1/8 and 1/4.
    """

    name: str
    downsample: int
    codebook_size: int


# Level names become attribute names (encoder_<name>) and keys of metrics and code shards.
LEVEL_NAME = re.compile(r"[a-z][a-z0-9_]*")
LEVEL_KEYS = tuple(f.name for f in fields(LevelSpec))


def _level_spec(index: int, spec: object) -> LevelSpec:
    """A validated LevelSpec from a LevelSpec or a mapping (as YAML, JSON or a checkpoint give)."""
    where = f"levels[{index}]"
    if isinstance(spec, LevelSpec):
        spec = {key: getattr(spec, key) for key in LEVEL_KEYS}
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"{where} must be a mapping with keys {', '.join(LEVEL_KEYS)}, got {spec!r}"
        )
    missing = [key for key in LEVEL_KEYS if key not in spec]
    unknown = sorted(str(key) for key in spec if key not in LEVEL_KEYS)
    if missing or unknown:
        raise ValueError(
            f"{where} must have exactly the keys {', '.join(LEVEL_KEYS)}; "
            f"missing {missing}, unknown {unknown}"
        )
    name, downsample = spec["name"], spec["downsample"]
    if not isinstance(name, str) or not LEVEL_NAME.fullmatch(name):
        raise ValueError(f"{where}.name must match {LEVEL_NAME.pattern}, got {name!r}")
    # The quantizers live in an nn.ModuleDict keyed by level name, which cannot hold a key that
    # is one of its own attributes.
    if hasattr(nn.ModuleDict(), name):
        raise ValueError(f"{where}.name {name!r} is reserved (an nn.ModuleDict attribute)")
    if not is_power_of_two(downsample):
        raise ValueError(f"{where}.downsample must be a power of two >= 2, got {downsample!r}")
    check_codebook_size(f"{where}.codebook_size", spec["codebook_size"])
    return LevelSpec(name, downsample, spec["codebook_size"])


def _level_specs(levels: object) -> tuple[LevelSpec, ...]:
    if isinstance(levels, (str, bytes, Mapping)) or not isinstance(levels, Sequence):
        raise ValueError(f"levels must be a list of level specs, top first, got {levels!r}")
    if not levels:
        raise ValueError(f"levels must hold at least one level, got {levels!r}")
    specs = tuple(_level_spec(i, spec) for i, spec in enumerate(levels))
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        if spec.name in seen:
            raise ValueError(
                f"levels[{i}].name {spec.name!r} is already the name of levels[{seen[spec.name]}]"
            )
        seen[spec.name] = i
    return specs


@dataclass
class VQVAE2Config:
    """VQ-VAE-2: a hierarchy of code maps, by default top codes at 1/8 and bottom codes at 1/4 of
    the image resolution.

    levels (None: the two default levels) lists the levels top first, each a LevelSpec or a
    mapping with keys name, downsample, codebook_size; it is stored as a tuple of LevelSpec.
    None means exactly [top: 2, codebook_size_top; bottom: 4, codebook_size_bottom], so configs
    and checkpoints written before levels existed keep their meaning. With levels given,
    codebook_size_top/bottom must stay at their default or agree with the levels of those names.
    Read the levels through level_specs(), which covers both cases.
    """

    # The encoder, decoder and quantizers are VQVAEConfig's blocks, with its defaults.
    in_channels: int = VQVAEConfig.in_channels
    channels: int = VQVAEConfig.channels
    res_blocks: int = VQVAEConfig.res_blocks
    res_channels: int = VQVAEConfig.res_channels
    embed_dim: int = VQVAEConfig.embed_dim
    codebook_size_top: int = DEFAULT_CODEBOOK_SIZE
    codebook_size_bottom: int = DEFAULT_CODEBOOK_SIZE
    beta: float = VQVAEConfig.beta
    codebook_update: str = VQVAEConfig.codebook_update
    decay: float = VQVAEConfig.decay
    data_init: bool = VQVAEConfig.data_init
    dead_code_threshold: float = VQVAEConfig.dead_code_threshold
    levels: tuple[LevelSpec, ...] | None = None

    def __post_init__(self) -> None:
        check_network_fields(self)
        check_codebook_size("codebook_size_top", self.codebook_size_top)
        check_codebook_size("codebook_size_bottom", self.codebook_size_bottom)
        check_quantizer_fields(self)
        if self.levels is not None:
            self.levels = _level_specs(self.levels)
            self._check_codebook_sizes_agree_with_levels()

    def _check_codebook_sizes_agree_with_levels(self) -> None:
        # A codebook size set both ways must not say two things; one set for a level that does
        # not exist would silently do nothing.
        index = {spec.name: i for i, spec in enumerate(self.levels)}
        for level in ("top", "bottom"):
            key = f"codebook_size_{level}"
            value = getattr(self, key)
            if value == DEFAULT_CODEBOOK_SIZE:
                continue
            if level not in index:
                raise ValueError(
                    f"{key}={value} sets the codebook of level {level!r}, which levels does not "
                    f"have; give each level's codebook_size in levels instead"
                )
            size = self.levels[index[level]].codebook_size
            if size != value:
                raise ValueError(
                    f"{key}={value} contradicts levels[{index[level]}].codebook_size={size}; "
                    f"give each level's codebook_size in levels only"
                )

    def level_specs(self) -> tuple[LevelSpec, ...]:
        """The levels, top first, whether given by levels or by the two-level defaults."""
        if self.levels is not None:
            return self.levels
        return (
            LevelSpec("top", 2, self.codebook_size_top),
            LevelSpec("bottom", 4, self.codebook_size_bottom),
        )


@dataclass
class AutoencoderOutput:
    """What every autoencoder's forward returns.

    loss is the scalar to back-propagate; terms are its (unweighted) parts for logging; stats are
    detached diagnostics such as codebook perplexity and usage per level.
    """

    reconstruction: torch.Tensor
    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


# -------------------------------------------------------------------------------------------------
# Building blocks


def init_conv_weights(module: nn.Module) -> None:
    """Unit-gain normal weights (std 1/sqrt(fan_in)) and zero biases for every conv in module.

    PyTorch's default conv init (std 1/sqrt(3 fan_in), non-zero biases) shrinks the signal about
    2.5x per ReLU layer. Eight layers deep, at the top quantiser, encoder outputs are ~1e-3 and
    mostly bias: the first Adam steps move them by more than their whole spread, the
    data-initialised top codes are left stranded, and the top codebook collapses to one or two
    codes. Unit gain keeps the top encoder output near 0.1 with a spread across positions
    comparable to its mean, while avoiding the growth of He init (gain sqrt(2)), which makes
    the first reconstructions explode through the residual additions.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            kh, kw = m.kernel_size
            # A stride-s transposed conv feeds each output from 1/s^2 of its kernel taps.
            taps = kh * kw if isinstance(m, nn.Conv2d) else kh * kw / (m.stride[0] * m.stride[1])
            nn.init.normal_(m.weight, std=math.sqrt(1.0 / (m.in_channels * taps)))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ResidualBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))): a narrow bottleneck keeps the block cheap."""

    def __init__(self, channels: int, res_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, res_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(res_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Not in-place: x is also the skip connection.
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


def residual_stack(channels: int, res_channels: int, res_blocks: int) -> nn.Sequential:
    return nn.Sequential(*[ResidualBlock(channels, res_channels) for _ in range(res_blocks)])


def _num_halvings(factor: int) -> int:
    if not is_power_of_two(factor):
        raise ValueError(f"resampling factor must be a power of two >= 2, got {factor}")
    return factor.bit_length() - 1


class Encoder(Recomputable):
    """Stride-2 4x4 convs (each halves H and W), then a 3x3 conv and a residual stack."""

    def __init__(
        self, in_channels: int, channels: int, res_blocks: int, res_channels: int, downsample: int
    ):
        super().__init__()
        steps = _num_halvings(downsample)
        layers: list[nn.Module] = []
        width = in_channels
        for i in range(steps):
            # Intermediate resolutions use half the width: they are the most expensive in memory.
            out = channels if i == steps - 1 else channels // 2
            layers += [nn.Conv2d(width, out, 4, stride=2, padding=1), nn.ReLU()]
            width = out
        self.down = nn.Sequential(*layers)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.res = residual_stack(channels, res_channels, res_blocks)

    @recomputed
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The residual stack ends on an addition; the final ReLU keeps features non-negative like
        # every other layer output.
        return F.relu(self.res(self.conv(self.down(x))))


class Decoder(Recomputable):
    """A 3x3 conv and a residual stack, then stride-2 transposed convs (each doubles H and W)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: int,
        res_blocks: int,
        res_channels: int,
        upsample: int,
    ):
        super().__init__()
        steps = _num_halvings(upsample)
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.res = residual_stack(channels, res_channels, res_blocks)
        layers: list[nn.Module] = []
        width = channels
        for i in range(steps):
            last = i == steps - 1
            out = out_channels if last else channels // 2
            layers.append(nn.ConvTranspose2d(width, out, 4, stride=2, padding=1))
            if not last:
                layers.append(nn.ReLU())
            width = out
        self.up = nn.Sequential(*layers)

    @recomputed
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.relu(self.res(self.conv(x))))


def upsampler(channels: int, factor: int) -> nn.Module:
    """Stride-2 4x4 transposed convs, with ReLUs between, that multiply H and W by factor.

    A factor of 2 is one bare layer, not a one-layer Sequential: its parameter names
    (upsample_top.weight) predate hierarchies deeper than two levels.
    """
    layers: list[nn.Module] = []
    for i in range(_num_halvings(factor)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1))
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


# -------------------------------------------------------------------------------------------------
# Shared checks and loss pieces


def check_images(x: torch.Tensor, in_channels: int, multiple: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"images must be B x C x H x W, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"images must be a float tensor in [-1, 1], got dtype {x.dtype}")
    if x.shape[1] != in_channels:
        raise ValueError(
            f"images have {x.shape[1]} channels, the model expects in_channels={in_channels}"
        )
    check_image_size(x.shape[2], x.shape[3], multiple)


def check_image_size(height: int, width: int, multiple: int) -> None:
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(
            f"image size {height}x{width} is not supported: height and width must be positive "
            f"multiples of {multiple}"
        )


def check_codes(
    codes: tuple[torch.Tensor, ...],
    levels: tuple[str, ...],
    codebook_sizes: tuple[int, ...],
) -> None:
    if not isinstance(codes, (tuple, list)) or len(codes) != len(levels):
        raise ValueError(
            f"expected a tuple of {len(levels)} code maps {levels}, got "
            f"{type(codes).__name__} of length {len(codes) if hasattr(codes, '__len__') else '?'}"
        )
    for name, size, c in zip(levels, codebook_sizes, codes):
        if not isinstance(c, torch.Tensor) or c.dim() != 3 or c.dtype != torch.long:
            shape = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
            dtype = c.dtype if isinstance(c, torch.Tensor) else None
            raise ValueError(
                f"{name} codes must be a B x h x w torch.long tensor, got {shape} ({dtype})"
            )
        # An out-of-range index becomes an opaque device-side assert on GPU; fail here instead.
        if c.numel() and (int(c.min()) < 0 or int(c.max()) >= size):
            raise ValueError(
                f"{name} codes must lie in [0, {size}), got values in "
                f"[{int(c.min())}, {int(c.max())}]"
            )


def reconstruction_loss(reconstruction: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # Mean squared error in float32: under bf16 autocast the decoder output is bf16, and a bf16
    # mean over millions of pixels loses most of its precision.
    return F.mse_loss(reconstruction.float(), x.float())


def add_quantizer_terms(
    out: QuantizerOutput, level: str, terms: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]
) -> None:
    terms[f"commitment/{level}"] = out.commitment
    terms[f"codebook/{level}"] = out.codebook_loss
    stats[f"perplexity/{level}"] = out.perplexity
    stats[f"usage/{level}"] = out.usage


def make_quantizer(num_codes: int, config: VQVAEConfig | VQVAE2Config) -> VectorQuantizer:
    return VectorQuantizer(
        num_codes,
        config.embed_dim,
        beta=config.beta,
        update=config.codebook_update,
        decay=config.decay,
        data_init=config.data_init,
        dead_code_threshold=config.dead_code_threshold,
    )


def quantize_for_inference(quantizer: VectorQuantizer, z: torch.Tensor) -> torch.Tensor:
    """Codes of z (B x D x H x W) without touching the quantizer's training state.

    Calling quantizer(z) in train mode would update the EMA statistics and might restart codes;
    encoding must leave the model exactly as it was, whatever its mode.
    """
    b, d, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(b * h * w, d)
    return quantizer.nearest(flat).view(b, h, w)


# -------------------------------------------------------------------------------------------------
# Models


class VQVAE(nn.Module):
    """One-level VQ-VAE (van den Oord et al., 2017): image -> codes at 1/4 -> image."""

    config_class = VQVAEConfig
    levels: tuple[str, ...] = ("codes",)
    downsample: tuple[int, ...] = (4,)

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        if not isinstance(config, VQVAEConfig):
            raise TypeError(f"VQVAE expects a VQVAEConfig, got {type(config).__name__}")
        self.config = config
        c = config
        self.encoder = Encoder(c.in_channels, c.channels, c.res_blocks, c.res_channels, 4)
        self.pre_quantize = nn.Conv2d(c.channels, c.embed_dim, 1)
        self.quantizers = nn.ModuleDict({"codes": make_quantizer(c.codebook_size, c)})
        self.decoder = Decoder(
            c.embed_dim, c.in_channels, c.channels, c.res_blocks, c.res_channels, 4
        )
        init_conv_weights(self)

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return (self.config.codebook_size,)

    def code_shape(self, height: int, width: int) -> tuple[tuple[int, int], ...]:
        check_image_size(height, width, 4)
        return ((height // 4, width // 4),)

    def forward(self, x: torch.Tensor) -> AutoencoderOutput:
        check_images(x, self.config.in_channels, 4)
        q = self.quantizers["codes"](self.pre_quantize(self.encoder(x)))
        reconstruction = self.decoder(q.quantized)
        terms = {"reconstruction": reconstruction_loss(reconstruction, x)}
        stats: dict[str, torch.Tensor] = {}
        add_quantizer_terms(q, "codes", terms, stats)
        loss = terms["reconstruction"] + q.loss
        return AutoencoderOutput(reconstruction, loss, terms, stats)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        check_images(x, self.config.in_channels, 4)
        with torch.inference_mode():
            codes = quantize_for_inference(
                self.quantizers["codes"], self.pre_quantize(self.encoder(x))
            )
        # Inference tensors cannot be saved for backward, and a prior's embedding layer saves its
        # indices: return an ordinary tensor so code maps can feed training directly.
        return (codes.clone(),)

    @torch.no_grad()
    def decode_codes(self, codes: tuple[torch.Tensor, ...]) -> torch.Tensor:
        check_codes(codes, self.levels, self.codebook_sizes)
        q = self.quantizers["codes"].lookup(codes[0])
        return self.decoder(q)


class VQVAE2(nn.Module):
    """VQ-VAE-2 (Razavi et al., 2019): each level's codes condition the codes of the level below.

    With levels l_0 (top) ... l_{L-1} (bottom), the default being top at 1/8 and bottom at 1/4:
    - encoders run bottom-up: encoder_<bottom> maps the image to features at the bottom's
      resolution, and each higher level's encoder maps the features of the level below to its own;
    - quantisers run top-down: the top quantises pre_quantize_<top>(features); each lower level l
      quantises pre_quantize_<l>(cat[guide, features_l]), where the guide is the quantised map of
      the level above brought to l's resolution by decoder_<above>, so a level's codes only need
      to store what the levels above could not;
    - the image decoder reads cat[upsample_<l>(q_l) for every level l above the bottom, q_bottom],
      all at the bottom's resolution.
    Attribute names are the checkpoint format (see the module docstring): the two-level model's
    keys are those it had before the depth was configurable.
    """

    config_class = VQVAE2Config
    # The default config's; an instance reports those of its own config.
    levels: tuple[str, ...] = ("top", "bottom")
    downsample: tuple[int, ...] = (8, 4)

    def __init__(self, config: VQVAE2Config):
        super().__init__()
        if not isinstance(config, VQVAE2Config):
            raise TypeError(f"VQVAE2 expects a VQVAE2Config, got {type(config).__name__}")
        self.config = config
        c = config
        d = c.embed_dim
        specs = c.level_specs()
        self.levels = tuple(spec.name for spec in specs)
        # Each level's factor relative to the image: the product of its own and those below it.
        totals: list[int] = []
        for spec in reversed(specs):
            totals.insert(0, spec.downsample * (totals[0] if totals else 1))
        self.downsample = tuple(totals)
        bottom = specs[-1]

        # Modules are created in the order of the two-level model (encoders bottom-up, then per
        # level top-down pre_quantize and decoder, quantizers, upsamplers, image decoder) so that
        # a seed gives it the same initial weights as before the depth was configurable.
        for spec in reversed(specs):
            # The bottom encoder reads the image, every other one the features of the level below.
            in_channels = c.in_channels if spec is bottom else c.channels
            encoder = Encoder(
                in_channels, c.channels, c.res_blocks, c.res_channels, spec.downsample
            )
            setattr(self, f"encoder_{spec.name}", encoder)
        for i, spec in enumerate(specs):
            # Below the top, the features are concatenated with the guide from the level above.
            in_channels = c.channels if i == 0 else c.channels + d
            setattr(self, f"pre_quantize_{spec.name}", nn.Conv2d(in_channels, d, 1))
            if spec is not bottom:
                decoder = Decoder(d, d, c.channels, c.res_blocks, c.res_channels, spec.downsample)
                setattr(self, f"decoder_{spec.name}", decoder)
        self.quantizers = nn.ModuleDict(
            {spec.name: make_quantizer(spec.codebook_size, c) for spec in specs}
        )
        for spec, total in zip(specs[:-1], totals):
            setattr(self, f"upsample_{spec.name}", upsampler(d, total // totals[-1]))
        self.decoder = Decoder(
            len(specs) * d,
            c.in_channels,
            c.channels,
            c.res_blocks,
            c.res_channels,
            bottom.downsample,
        )
        init_conv_weights(self)

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return tuple(spec.codebook_size for spec in self.config.level_specs())

    def code_shape(self, height: int, width: int) -> tuple[tuple[int, int], ...]:
        check_image_size(height, width, self.downsample[0])
        return tuple((height // f, width // f) for f in self.downsample)

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features of each level, top first."""
        features: list[torch.Tensor] = []
        for level in reversed(self.levels):
            features.insert(0, getattr(self, f"encoder_{level}")(features[0] if features else x))
        return features

    def _pre_quantize(
        self, index: int, features: torch.Tensor, guide: torch.Tensor | None
    ) -> torch.Tensor:
        pre_quantize = getattr(self, f"pre_quantize_{self.levels[index]}")
        return pre_quantize(features if index == 0 else torch.cat([guide, features], dim=1))

    def _guide(self, index: int, quantized: torch.Tensor) -> torch.Tensor | None:
        """The quantised map of level `index` at the resolution of the level below (None at the
        bottom)."""
        if index == len(self.levels) - 1:
            return None
        return getattr(self, f"decoder_{self.levels[index]}")(quantized)

    def _decode(self, quantized: list[torch.Tensor]) -> torch.Tensor:
        upsampled = [
            getattr(self, f"upsample_{level}")(q) for level, q in zip(self.levels, quantized[:-1])
        ]
        return self.decoder(torch.cat([*upsampled, quantized[-1]], dim=1))

    def forward(self, x: torch.Tensor) -> AutoencoderOutput:
        check_images(x, self.config.in_channels, self.downsample[0])
        outputs: list[QuantizerOutput] = []
        guide = None
        for i, features in enumerate(self._features(x)):
            q = self.quantizers[self.levels[i]](self._pre_quantize(i, features, guide))
            guide = self._guide(i, q.quantized)
            outputs.append(q)
        reconstruction = self._decode([q.quantized for q in outputs])

        terms = {"reconstruction": reconstruction_loss(reconstruction, x)}
        stats: dict[str, torch.Tensor] = {}
        loss = terms["reconstruction"]
        for level, q in zip(self.levels, outputs):
            add_quantizer_terms(q, level, terms, stats)
            loss = loss + q.loss
        return AutoencoderOutput(reconstruction, loss, terms, stats)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        check_images(x, self.config.in_channels, self.downsample[0])
        codes: list[torch.Tensor] = []
        with torch.inference_mode():
            guide = None
            for i, features in enumerate(self._features(x)):
                quantizer = self.quantizers[self.levels[i]]
                codes.append(
                    quantize_for_inference(quantizer, self._pre_quantize(i, features, guide))
                )
                guide = self._guide(i, quantizer.lookup(codes[-1]))
        # Ordinary tensors, not inference tensors: see VQVAE.encode.
        return tuple(c.clone() for c in codes)

    @torch.no_grad()
    def decode_codes(self, codes: tuple[torch.Tensor, ...]) -> torch.Tensor:
        check_codes(codes, self.levels, self.codebook_sizes)
        for i, spec in enumerate(self.config.level_specs()[:-1]):
            above, below = codes[i], codes[i + 1]
            f = spec.downsample
            if below.shape[0] != above.shape[0] or below.shape[1:] != (
                f * above.shape[1],
                f * above.shape[2],
            ):
                raise ValueError(
                    f"{self.levels[i + 1]} codes must be {f} times the size of {spec.name} codes "
                    f"with the same batch, got {spec.name} {tuple(above.shape)} and "
                    f"{self.levels[i + 1]} {tuple(below.shape)}"
                )
        return self._decode(
            [self.quantizers[level].lookup(c) for level, c in zip(self.levels, codes)]
        )
