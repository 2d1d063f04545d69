"""Gated PixelCNN prior over code maps (van den Oord et al. 2016, "Conditional Image Generation
with PixelCNN Decoders"), and the pieces every vq_core prior shares: input checks, class and
code-map conditioning, the loss in bits and the sampling entry points.

Causality without a blind spot comes from two stacks:
- the vertical stack: features at row i that depend only on the codes in rows < i (a strict
  first layer, then convolutions over rows <= i of those features);
- the horizontal stack: features at (i, j) from the codes left of j in row i (a strict first
  layer, then convolutions over columns <= j), plus the vertical features at (i, j).
Together they see every position before (i, j) in raster order and nothing else. Each layer
gates its activations as tanh(a) * sigmoid(b) and adds a class bias and condition features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vq_core.recompute import Recomputable, recomputed
from vq_core.sampling import (
    DEFAULT_METHOD,
    CausalConv2d,
    PointwiseConv,
    Region,
    StepCache,
    crop,
    sample_codes,
)


def require_int(config: object, field: str, minimum: int) -> int:
    """config.field if it is an integer >= minimum, else a ValueError naming field and value."""
    value = getattr(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"{type(config).__name__}.{field} must be an integer >= {minimum}, got {value!r}"
        )
    return value


def check_kernel_size(config: object) -> None:
    """Validate a convolutional prior's kernel_size: an odd integer >= 3."""
    kernel_size = require_int(config, "kernel_size", 3)
    if kernel_size % 2 == 0:
        raise ValueError(f"{type(config).__name__}.kernel_size must be odd, got {kernel_size}")


def check_dropout(config: object, field: str = "dropout") -> None:
    """Validate a prior's dropout rate ``field`` (dropout, label_dropout): a number in [0, 1)."""
    rate = getattr(config, field)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)):
        raise ValueError(f"{type(config).__name__}.{field} must be a number, got {rate!r}")
    if not 0 <= rate < 1:
        raise ValueError(f"{type(config).__name__}.{field} must be in [0, 1), got {rate}")


def check_prior_config(config: object) -> None:
    """Validate the fields every prior config shares; errors name the field and its value."""
    require_int(config, "num_codes", 2)
    height, width = require_int(config, "height", 1), require_int(config, "width", 1)
    require_int(config, "channels", 1)
    require_int(config, "num_classes", 0)
    check_dropout(config, "label_dropout")
    require_int(config, "condition_channels", 1)
    require_int(config, "condition_res_blocks", 0)
    if require_int(config, "condition_num_codes", 0) > 0:
        # The condition map is a coarser grid (the top codes for a bottom prior) that nearest
        # upsampling maps onto the prior's grid, so its sides must divide the prior's.
        cond_height = require_int(config, "condition_height", 1)
        cond_width = require_int(config, "condition_width", 1)
        if height % cond_height or width % cond_width:
            raise ValueError(
                f"{type(config).__name__}: the condition map ({cond_height}x{cond_width}) must "
                f"divide the code map ({height}x{width}) evenly in both directions"
            )


def class_rows(config: object) -> int:
    """Rows of a prior's class embedding: one per class and, when the prior trains with label
    dropout, one more for the "no class" label (``num_classes``) that the dropped labels become.
    0 for an unconditional prior, on which label_dropout has no effect."""
    if config.num_classes == 0:
        return 0
    return config.num_classes + (1 if config.label_dropout > 0 else 0)


def _as_index_tensor(value: object, what: str, device: torch.device) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{what} must be an integer tensor, got {type(value).__name__}")
    if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
        raise TypeError(f"{what} must be an integer tensor (torch.long), got dtype {value.dtype}")
    return value.to(device=device, dtype=torch.long)


def _check_range(values: Tensor, what: str, count: int) -> None:
    if values.numel() == 0:
        return
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= count:
        raise ValueError(f"{what} must lie in [0, {count - 1}], got values from {low} to {high}")


def bits_per_code(logits: Tensor, codes: Tensor) -> Tensor:
    """Mean negative log-likelihood in bits of B x h x w codes under B x K x h x w logits. For
    training through a wrapper (DistributedDataParallel), whose forward must be the one called:
    bits_per_code(wrapped(codes, labels, condition), codes) equals prior.loss(...)."""
    return F.cross_entropy(logits.float(), codes.long()) / math.log(2)


@dataclass
class PriorContext:
    """What a batch is conditioned on, computed once: labels (B,) and the condition stack's
    features already at the prior's grid (B x C x H x W)."""

    labels: Tensor | None
    condition: Tensor | None


class ConditionStack(nn.Module):
    """Non-causal features of a coarser code map (the top codes, for the bottom prior), upsampled
    to the prior's grid. Every position of the condition is visible to every prior position."""

    def __init__(self, num_codes: int, channels: int, res_blocks: int, scale: tuple[int, int]):
        super().__init__()
        self.embedding = nn.Embedding(num_codes, channels)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.ELU(),
                nn.Conv2d(channels, channels, 3, padding=1),
                nn.ELU(),
                nn.Conv2d(channels, channels, 3, padding=1),
            )
            for _ in range(res_blocks)
        )
        self.scale = scale

    def forward(self, condition: Tensor) -> Tensor:
        x = self.embedding(condition).permute(0, 3, 1, 2)
        for block in self.blocks:
            x = x + block(x)
        # Nearest upsampling: each condition code covers a scale_y x scale_x patch of the grid.
        return x.repeat_interleave(self.scale[0], dim=2).repeat_interleave(self.scale[1], dim=3)


class BlockConditioning(nn.Module):
    """Adds a block's class bias (an embedding of the label; ``class_rows`` labels, see
    ``class_rows``) and a 1x1 projection of the condition features to its pre-activations. Absent
    parts cost nothing."""

    def __init__(self, channels: int, class_rows: int, condition_channels: int) -> None:
        super().__init__()
        self.class_embedding = nn.Embedding(class_rows, channels) if class_rows > 0 else None
        self.condition = (
            PointwiseConv(condition_channels, channels, bias=False) if condition_channels else None
        )

    def forward(
        self,
        h: Tensor,
        context: PriorContext,
        cache: StepCache | None = None,
        region: Region | None = None,
    ) -> Tensor:
        if self.class_embedding is not None:
            # The label is fixed for the whole sample: look it up once per sampling run.
            bias = None if cache is None else cache.store.get(self)
            if bias is None:
                bias = self.class_embedding(context.labels)[:, :, None, None]
                if cache is not None:
                    cache.store[self] = bias
            # In h's dtype: a float32 bias would turn a bfloat16 (autocast) stream back into
            # float32, and every later layer would save float32 activations.
            h = h + bias.to(h.dtype)
        if self.condition is not None:
            h = h + self.condition(crop(context.condition, region))
        return h


class CodePrior(nn.Module):
    """Base of the vq_core priors: an embedding of the K codes, an optional condition stack, input
    checks, loss in bits per code and sampling. A subclass builds its layers and implements
    `_network(x, context, cache)`, written once for full maps (cache None; x the B x C x H x W
    code embedding) and for sampling steps (x None; spatial ops read and write the cache), and
    `_code_readers()`, the strict first layers that read the code embedding directly."""

    config_class: type

    def __init__(self, config: object) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} is built from a {self.config_class.__name__}, "
                f"got {type(config).__name__}"
            )
        self.config = config
        self.embedding = nn.Embedding(config.num_codes, config.channels)
        self.condition_stack = None
        if config.condition_num_codes > 0:
            scale = (
                config.height // config.condition_height,
                config.width // config.condition_width,
            )
            self.condition_stack = ConditionStack(
                config.condition_num_codes,
                config.condition_channels,
                config.condition_res_blocks,
                scale,
            )

    @property
    def null_label(self) -> int | None:
        """The "no class" label of a class-conditional prior trained with label dropout
        (``num_classes``), which classifier-free guidance samples with; None for other priors."""
        cfg = self.config
        return cfg.num_classes if class_rows(cfg) > cfg.num_classes else None

    @property
    def condition_channels(self) -> int:
        """Channels of the condition features the blocks receive (0 without a condition map)."""
        return self.config.condition_channels if self.condition_stack is not None else 0

    def _network(
        self, x: Tensor | None, context: PriorContext, cache: StepCache | None = None
    ) -> Tensor:
        raise NotImplementedError

    def _code_readers(self) -> list[CausalConv2d]:
        raise NotImplementedError

    # ----------------------------------------------------------------- input checks

    def check_codes(self, codes: Tensor) -> Tensor:
        """`codes` as a B x h x w long tensor on the model's device, or an error saying why not."""
        cfg = self.config
        codes = _as_index_tensor(codes, "codes", self.embedding.weight.device)
        if codes.dim() != 3 or tuple(codes.shape[1:]) != (cfg.height, cfg.width):
            raise ValueError(
                f"codes must have shape B x {cfg.height} x {cfg.width}, got {tuple(codes.shape)}"
            )
        _check_range(codes, "codes", cfg.num_codes)
        return codes

    def check_conditioning(
        self, labels: Tensor | None, condition: Tensor | None, batch: int
    ) -> tuple[Tensor | None, Tensor | None]:
        """Check labels (batch,) and condition (batch x h' x w') against the config: each is
        required exactly when the prior was built for it. Returns them as long tensors on the
        model's device."""
        cfg = self.config
        device = self.embedding.weight.device
        if cfg.num_classes > 0:
            if labels is None:
                raise ValueError(
                    f"this prior is class-conditional (num_classes={cfg.num_classes}): "
                    f"pass labels of shape ({batch},)"
                )
            labels = _as_index_tensor(labels, "labels", device)
            if tuple(labels.shape) != (batch,):
                raise ValueError(
                    f"labels must have shape ({batch},), one per sample, got {tuple(labels.shape)}"
                )
            # A prior trained with label dropout also takes its "no class" label, num_classes.
            _check_range(labels, "labels", class_rows(cfg))
        elif labels is not None:
            raise ValueError("this prior is unconditional (num_classes=0) but labels were given")

        if cfg.condition_num_codes > 0:
            shape = (batch, cfg.condition_height, cfg.condition_width)
            if condition is None:
                raise ValueError(
                    f"this prior is conditioned on a code map (condition_num_codes="
                    f"{cfg.condition_num_codes}): pass condition of shape {shape}"
                )
            condition = _as_index_tensor(condition, "condition", device)
            if tuple(condition.shape) != shape:
                raise ValueError(f"condition must have shape {shape}, got {tuple(condition.shape)}")
            _check_range(condition, "condition", cfg.condition_num_codes)
        elif condition is not None:
            raise ValueError(
                "this prior has no condition map (condition_num_codes=0) but condition was given"
            )
        return labels, condition

    # ----------------------------------------------------------------- training

    def _context(self, labels: Tensor | None, condition: Tensor | None) -> PriorContext:
        if labels is not None and self.training and self.null_label is not None:
            # Label dropout: in training, each image's label becomes "no class" with probability
            # label_dropout, so the one network also learns the unconditional distribution that
            # classifier-free guidance contrasts the class-conditional one with.
            dropped = torch.rand(labels.shape, device=labels.device) < self.config.label_dropout
            labels = labels.masked_fill(dropped, self.null_label)
        features = None if self.condition_stack is None else self.condition_stack(condition)
        return PriorContext(labels=labels, condition=features)

    def forward(
        self, codes: Tensor, labels: Tensor | None = None, condition: Tensor | None = None
    ) -> Tensor:
        """Logits B x K x h x w; those at a position depend only on the codes before it in raster
        order (and on labels and condition, which are visible everywhere)."""
        codes = self.check_codes(codes)
        labels, condition = self.check_conditioning(labels, condition, codes.shape[0])
        x = self.embedding(codes).permute(0, 3, 1, 2)
        return self._network(x, self._context(labels, condition))

    def loss(
        self, codes: Tensor, labels: Tensor | None = None, condition: Tensor | None = None
    ) -> Tensor:
        """Mean negative log-likelihood of the codes in bits per code."""
        codes = self.check_codes(codes)
        return bits_per_code(self(codes, labels, condition), codes)

    # ----------------------------------------------------------------- sampling

    def sample(
        self,
        n: int,
        labels: Tensor | None = None,
        condition: Tensor | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        method: str = DEFAULT_METHOD,
        guidance: float = 1.0,
    ) -> Tensor:
        """n code maps (n x h x w long). method="cached" (default) reuses earlier positions'
        activations; "naive" runs a full forward pass per position. Both give the same codes.
        guidance != 1 is classifier-free guidance (see ``vq_core.sampling.sample_codes``)."""
        return sample_codes(
            self,
            n,
            labels,
            condition,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
            method=method,
            guidance=guidance,
        )

    def begin_sampling(self, n: int, labels: Tensor | None, condition: Tensor | None) -> StepCache:
        """A fresh cache for n samples, with the conditioning computed once for the whole run."""
        return StepCache(
            n, self.config.height, self.config.width, context=self._context(labels, condition)
        )

    def sampling_step(self, cache: StepCache, row: int, col: int) -> Tensor:
        """n x K logits at (row, col): the position after the last one observed, because the
        cache holds the codes and activations of exactly the positions before it."""
        if row * cache.width + col != cache.observed:
            expected = divmod(cache.observed, cache.width)
            raise ValueError(
                f"sampling steps must follow raster order: expected position {expected} "
                f"(the codes of {cache.observed} positions were observed), got ({row}, {col})"
            )
        cache.row, cache.col = row, col
        return self._network(None, cache.context, cache)[:, :, 0, 0]

    def observe(self, cache: StepCache, codes: Tensor) -> None:
        """Feed the n codes just drawn at the current position to the layers that read codes."""
        x = self.embedding(codes)[:, :, None, None]
        for layer in self._code_readers():
            layer.write(x, cache, cache.position_region)
        cache.observed += 1


# --------------------------------------------------------------------------- Gated PixelCNN


@dataclass
class GatedPixelCNNConfig:
    """Gated PixelCNN sizes. Vertical kernels are (k//2 + 1) x k and horizontal ones
    1 x (k//2 + 1) for kernel_size k. num_classes=0 means unconditional; condition_num_codes=0
    means no condition map. label_dropout > 0 replaces that fraction of the training labels with
    a "no class" label, which classifier-free guidance samples against."""

    num_codes: int
    height: int
    width: int
    channels: int = 128
    num_layers: int = 8
    kernel_size: int = 5
    num_classes: int = 0
    label_dropout: float = 0.0
    condition_num_codes: int = 0
    condition_height: int = 0
    condition_width: int = 0
    condition_channels: int = 64
    condition_res_blocks: int = 2

    def __post_init__(self) -> None:
        check_prior_config(self)
        check_kernel_size(self)
        require_int(self, "num_layers", 1)


def gate(x: Tensor) -> Tensor:
    """tanh(a) * sigmoid(b) over the two halves of the channels."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(Recomputable):
    """One layer of both stacks. The first layer reads the code embedding through strict
    footprints and has no residual connections (its input at (i, j) is the code at (i, j))."""

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        first: bool,
        class_rows: int,
        condition_channels: int,
    ) -> None:
        super().__init__()
        half = kernel_size // 2
        strict = "_strict" if first else ""
        self.first = first
        self.vertical = CausalConv2d(
            channels, 2 * channels, (half + 1, kernel_size), "vertical" + strict
        )
        self.horizontal = CausalConv2d(channels, 2 * channels, (1, half + 1), "horizontal" + strict)
        self.vertical_to_horizontal = PointwiseConv(2 * channels, 2 * channels)
        self.horizontal_out = PointwiseConv(channels, channels)
        self.vertical_conditioning = BlockConditioning(2 * channels, class_rows, condition_channels)
        self.horizontal_conditioning = BlockConditioning(
            2 * channels, class_rows, condition_channels
        )

    @recomputed
    def forward_vertical(
        self,
        v: Tensor | None,
        context: PriorContext,
        cache: StepCache | None,
        region: Region | None,
    ) -> tuple[Tensor, Tensor]:
        """The next vertical features, and this layer's contribution to the horizontal stack."""
        features = self.vertical(v, cache, region)
        link = self.vertical_to_horizontal(features)
        out = gate(self.vertical_conditioning(features, context, cache, region))
        return (out if self.first else v + out), link

    @recomputed
    def forward_horizontal(
        self,
        h: Tensor | None,
        link: Tensor,
        context: PriorContext,
        cache: StepCache | None,
        region: Region | None,
    ) -> Tensor:
        features = self.horizontal(h, cache, region) + link
        out = self.horizontal_out(
            gate(self.horizontal_conditioning(features, context, cache, region))
        )
        return out if self.first else h + out


class GatedPixelCNN(CodePrior):
    """Gated PixelCNN prior: logits B x K x h x w over a code map, optionally conditioned on a
    class label and a coarser code map."""

    config_class = GatedPixelCNNConfig

    def __init__(self, config: GatedPixelCNNConfig) -> None:
        super().__init__(config)
        c = config.channels
        self.layers = nn.ModuleList(
            GatedLayer(c, config.kernel_size, i == 0, class_rows(config), self.condition_channels)
            for i in range(config.num_layers)
        )
        self.head = nn.Sequential(
            nn.ReLU(), PointwiseConv(c, c), nn.ReLU(), PointwiseConv(c, config.num_codes)
        )

    def _code_readers(self) -> list[CausalConv2d]:
        return [self.layers[0].vertical, self.layers[0].horizontal]

    def _network(
        self, x: Tensor | None, context: PriorContext, cache: StepCache | None = None
    ) -> Tensor:
        row = position = None
        if cache is not None:
            row, position = cache.row_region, cache.position_region
        # The vertical stack depends on rows above only: when sampling, run it for the whole
        # row on the row's first step and keep its links to the horizontal stack.
        if cache is None or cache.col == 0:
            links, v = [], x
            for layer in self.layers:
                v, link = layer.forward_vertical(v, context, cache, row)
                links.append(link)
            if cache is not None:
                cache.store[(self, "links")] = links
        else:
            links = cache.store[(self, "links")]
        if cache is not None:
            links = [cache.column(link) for link in links]

        h = x
        for layer, link in zip(self.layers, links, strict=True):
            h = layer.forward_horizontal(h, link, context, cache, position)
        return self.head(h)
