"""PixelSNAIL prior over code maps (Chen et al. 2018), as VQ-VAE-2 uses it: p(top | class) with
causal self-attention, p(bottom | top, class) without.

The convolutional trunk follows PixelCNN++: two streams of gated residual blocks,
- a vertical stream u whose features at row i depend only on rows < i (down-shifted convs),
- a horizontal stream ul whose features at (i, j) depend on the positions before (i, j)
  (down-right-shifted convs), which also reads u at every block,
so the convolutions alone have no blind spot. After each block's residual blocks, a causal
multi-head self-attention over ul (plus positional "background" features) lets every position
read any earlier one. Residual blocks are conv, ELU, conv, then a gate a * sigmoid(b); the class
bias and condition features are added before the gate in every block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vq_core.pixelcnn import (
    BlockConditioning,
    CodePrior,
    GatedPixelCNNConfig,
    PriorContext,
    check_dropout,
    check_kernel_size,
    check_prior_config,
    class_rows,
    require_int,
)
from vq_core.recompute import Recomputable, recomputed
from vq_core.sampling import CausalConv2d, PointwiseConv, Region, StepCache, crop

# The positional "background" features: each position's row and column coordinates.
BACKGROUND_CHANNELS = 2


@dataclass
class PixelSNAILConfig:
    """PixelSNAIL sizes. Each of the num_blocks blocks holds res_blocks gated residual blocks per
    stream and, if `attention`, one causal self-attention. Vertical convolutions are
    (k//2 + 1) x k and horizontal ones (k//2 + 1) x (k//2 + 1) for kernel_size k.
    attention_channels is the query/key/value width summed over the heads. num_classes=0 means
    unconditional; condition_num_codes=0 means no condition map. label_dropout > 0 replaces that
    fraction of the training labels with a "no class" label, which classifier-free guidance
    samples against."""

    num_codes: int
    height: int
    width: int
    channels: int = 128
    num_blocks: int = 4
    res_blocks: int = 2
    kernel_size: int = 3
    attention: bool = True
    num_heads: int = 4
    attention_channels: int = 128
    dropout: float = 0.1
    num_classes: int = 0
    label_dropout: float = 0.0
    condition_num_codes: int = 0
    condition_height: int = 0
    condition_width: int = 0
    # The condition stack is the one every prior shares (vq_core.pixelcnn), with its defaults.
    condition_channels: int = GatedPixelCNNConfig.condition_channels
    condition_res_blocks: int = GatedPixelCNNConfig.condition_res_blocks

    def __post_init__(self) -> None:
        check_prior_config(self)
        check_kernel_size(self)
        for field in ("num_blocks", "res_blocks", "num_heads", "attention_channels"):
            require_int(self, field, 1)
        if not isinstance(self.attention, bool):
            raise ValueError(
                f"PixelSNAILConfig.attention must be True or False, got {self.attention!r}"
            )
        if self.attention_channels % self.num_heads:
            raise ValueError(
                f"PixelSNAILConfig.attention_channels ({self.attention_channels}) must be a "
                f"multiple of num_heads ({self.num_heads})"
            )
        check_dropout(self)


class GatedResidual(Recomputable):
    """x + a * sigmoid(b), with (a, b) = conv(dropout(elu(conv(elu(x)) + aux))) + conditioning.
    `aux` (another stream's features at the same positions) enters through a 1x1 projection."""

    def __init__(
        self,
        channels: int,
        conv: Callable[[int, int], nn.Module],
        aux_channels: int,
        dropout: float,
        class_rows: int,
        condition_channels: int,
    ) -> None:
        super().__init__()
        self.conv_in = conv(channels, channels)
        self.aux = PointwiseConv(aux_channels, channels) if aux_channels else None
        self.dropout = nn.Dropout(dropout)
        self.conv_out = conv(channels, 2 * channels)
        self.conditioning = BlockConditioning(2 * channels, class_rows, condition_channels)

    @recomputed
    def forward(
        self,
        x: Tensor,
        aux: Tensor | None,
        context: PriorContext,
        cache: StepCache | None = None,
        region: Region | None = None,
    ) -> Tensor:
        h = self.conv_in(F.elu(x), cache, region)
        if self.aux is not None:
            h = h + self.aux(F.elu(aux))
        h = self.conv_out(self.dropout(F.elu(h)), cache, region)
        a, b = self.conditioning(h, context, cache, region).chunk(2, dim=1)
        return x + a * torch.sigmoid(b)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position p attends to positions <= p in raster order.

    Attending to itself is safe because the horizontal stream at p depends only on codes before
    p, and it means position 0 has something to attend to. In step mode the keys and values of
    earlier positions come from the cache, and the current position's are appended."""

    def __init__(self, in_channels: int, channels: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.query = PointwiseConv(in_channels, channels)
        self.key = PointwiseConv(in_channels, channels)
        self.value = PointwiseConv(in_channels, channels)
        self.num_heads = num_heads
        self.dropout = dropout

    def forward(self, x: Tensor, cache: StepCache | None = None) -> Tensor:
        batch, _, height, width = x.shape
        channels = self.query.out_channels

        def split_heads(t: Tensor) -> Tensor:  # B x C x h x w -> B x heads x h*w x C/heads
            # Contiguous, because on the CPU a strided layout sends attention to the slow,
            # memory-hungry reference kernel instead of the fused one.
            t = t.reshape(batch, self.num_heads, -1, height * width).transpose(2, 3)
            return t.contiguous()

        q, k, v = (split_heads(proj(x)) for proj in (self.query, self.key, self.value))
        if cache is None:
            dropout = self.dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            if height * width != 1:
                raise ValueError(
                    f"step mode attends from one position, got a {height}x{width} region"
                )
            entry = cache.store.get(self)
            if entry is None:
                shape = (batch, self.num_heads, cache.height * cache.width, k.shape[-1])
                entry = (k.new_zeros(shape), v.new_zeros(shape))
                cache.store[self] = entry
            keys, values = entry
            p = cache.position
            keys[:, :, p : p + 1] = k
            values[:, :, p : p + 1] = v
            out = F.scaled_dot_product_attention(q, keys[:, :, : p + 1], values[:, :, : p + 1])
        return out.transpose(2, 3).reshape(batch, channels, height, width)


class AttentionBlock(Recomputable):
    """Attention over the horizontal stream and the background, merged back by a 1x1 gated
    residual block."""

    def __init__(self, config: PixelSNAILConfig, background_channels: int, condition_channels: int):
        super().__init__()
        c = config.channels
        self.attention = CausalSelfAttention(
            c + background_channels, config.attention_channels, config.num_heads, config.dropout
        )
        self.residual = GatedResidual(
            c,
            PointwiseConv,
            config.attention_channels,
            config.dropout,
            class_rows(config),
            condition_channels,
        )

    @recomputed
    def forward(
        self,
        x: Tensor,
        background: Tensor,
        context: PriorContext,
        cache: StepCache | None = None,
        region: Region | None = None,
    ) -> Tensor:
        background = crop(background, region).expand(x.shape[0], -1, -1, -1)
        attended = self.attention(torch.cat([x, background], dim=1), cache)
        return self.residual(x, attended, context, cache, region)


class PixelSNAILBlock(nn.Module):
    """res_blocks gated residual blocks on each stream (the horizontal ones also read the
    vertical stream), then, if configured, attention over the horizontal stream."""

    def __init__(self, config: PixelSNAILConfig, condition_channels: int) -> None:
        super().__init__()
        c, k, half = config.channels, config.kernel_size, config.kernel_size // 2

        def vertical_conv(i: int, o: int) -> CausalConv2d:
            return CausalConv2d(i, o, (half + 1, k), "vertical")

        def horizontal_conv(i: int, o: int) -> CausalConv2d:
            return CausalConv2d(i, o, (half + 1, half + 1), "horizontal")

        common = dict(
            dropout=config.dropout,
            class_rows=class_rows(config),
            condition_channels=condition_channels,
        )
        self.vertical = nn.ModuleList(
            GatedResidual(c, vertical_conv, 0, **common) for _ in range(config.res_blocks)
        )
        self.horizontal = nn.ModuleList(
            GatedResidual(c, horizontal_conv, c, **common) for _ in range(config.res_blocks)
        )
        self.attention = None
        if config.attention:
            self.attention = AttentionBlock(config, BACKGROUND_CHANNELS, condition_channels)


class PixelSNAIL(CodePrior):
    """PixelSNAIL prior: logits B x K x h x w over a code map, optionally conditioned on a class
    label and a coarser code map (the top codes, for the bottom prior)."""

    config_class = PixelSNAILConfig

    def __init__(self, config: PixelSNAILConfig) -> None:
        super().__init__(config)
        c, k, half = config.channels, config.kernel_size, config.kernel_size // 2
        # Strict first layers (they read the codes): u sees the rows above; ul sees the row above
        # and the columns to the left.
        self.vertical_input = CausalConv2d(c, c, (half + 1, k), "vertical_strict")
        self.horizontal_input_above = CausalConv2d(c, c, (1, k), "vertical_strict")
        self.horizontal_input_left = CausalConv2d(c, c, (half + 1, 1), "horizontal_strict")
        self.blocks = nn.ModuleList(
            PixelSNAILBlock(config, self.condition_channels) for _ in range(config.num_blocks)
        )
        self.head = nn.Sequential(
            nn.ELU(), PointwiseConv(c, c), nn.ELU(), PointwiseConv(c, config.num_codes)
        )
        # Background: the (row, column) coordinates in [-0.5, 0.5), so attention can weigh
        # positions by where they are. Rebuilt from the config, hence not in checkpoints.
        rows = torch.arange(config.height, dtype=torch.float32) / config.height - 0.5
        cols = torch.arange(config.width, dtype=torch.float32) / config.width - 0.5
        grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))
        self.register_buffer("background", grid.unsqueeze(0), persistent=False)

    def _code_readers(self) -> list[CausalConv2d]:
        return [self.vertical_input, self.horizontal_input_above, self.horizontal_input_left]

    def _network(
        self, x: Tensor | None, context: PriorContext, cache: StepCache | None = None
    ) -> Tensor:
        row = position = None
        if cache is not None:
            row, position = cache.row_region, cache.position_region
        # The vertical stream depends on rows above only: when sampling, run it for the whole
        # row on the row's first step and keep every block's output for the row's positions.
        if cache is None or cache.col == 0:
            u = self.vertical_input(x, cache, row)
            vertical = []
            for block in self.blocks:
                for residual in block.vertical:
                    u = residual(u, None, context, cache, row)
                    vertical.append(u)
            if cache is not None:
                cache.store[(self, "vertical")] = vertical
        else:
            vertical = cache.store[(self, "vertical")]
        if cache is not None:
            vertical = [cache.column(u) for u in vertical]

        ul = self.horizontal_input_above(x, cache, position) + self.horizontal_input_left(
            x, cache, position
        )
        u_features = iter(vertical)
        for block in self.blocks:
            for residual in block.horizontal:
                ul = residual(ul, next(u_features), context, cache, position)
            if block.attention is not None:
                ul = block.attention(ul, self.background, context, cache, position)
        return self.head(ul)
