"""Transformer prior over code maps: a decoder-only (GPT-style) model of the raster-ordered codes of
one level, the second stage of DALL-E and of the image-token models after it (VQGAN's transformer,
LlamaGen), here with class labels in place of text.

The h x w map is read as a sequence of P = h*w codes in raster order. The input at position p is
the embedding of the code at p - 1 (at p = 0 a learned start token), plus learned embeddings of
p's row and column, of the class (at every position, as the convolutional priors add a class bias
in every block: on a toy it learned faster than a class start token alone) and, for a prior below
the top, a projection of the condition features at p (the level above, through the condition
stack every prior shares, upsampled to this grid). Causal self-attention then lets the output at p
read the inputs at positions <= p, which hold exactly the codes before p, the class and the
condition: the logits at p predict the code at p.

Blocks are pre-norm (x + attention(norm(x)), then x + mlp(norm(x))), followed by a final norm and
a linear head whose weight may be the code embedding's (``tie_embeddings``). Sampling keeps every
layer's keys and values of the positions seen so far (a KV cache), so a step runs the network on
one position, and draws the same codes as a full forward pass per position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vq_core.pixelcnn import (
    CodePrior,
    GatedPixelCNNConfig,
    PriorContext,
    check_dropout,
    check_prior_config,
    class_rows,
    require_int,
)
from vq_core.recompute import Recomputable, recomputed
from vq_core.sampling import StepCache


@dataclass
class TransformerPriorConfig:
    """Transformer sizes. channels is the model width (d_model), split over num_heads heads; each
    of the num_layers blocks has an MLP of mlp_ratio x channels hidden units. dropout applies to
    the inputs, the attention weights and each residual branch. tie_embeddings makes the output
    head's weight the code embedding. num_classes=0 means unconditional; condition_num_codes=0
    means no condition map. label_dropout > 0 replaces that fraction of the training labels with
    a "no class" label, which classifier-free guidance samples against."""

    num_codes: int
    height: int
    width: int
    channels: int = 256
    num_layers: int = 8
    num_heads: int = 8
    mlp_ratio: int = 4
    dropout: float = 0.1
    tie_embeddings: bool = True
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
        for field in ("num_layers", "num_heads", "mlp_ratio"):
            require_int(self, field, 1)
        if self.channels % self.num_heads:
            raise ValueError(
                f"TransformerPriorConfig.channels ({self.channels}) must be a multiple of "
                f"num_heads ({self.num_heads})"
            )
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(
                "TransformerPriorConfig.tie_embeddings must be True or False, "
                f"got {self.tie_embeddings!r}"
            )
        check_dropout(self)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention over B x L x C sequences in which position p attends to positions
    <= p. In step mode (one position, a cache) the keys and values of earlier positions come from
    the cache and the current position's are written into it."""

    def __init__(self, channels: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)
        self.num_heads = num_heads
        self.dropout = dropout

    def forward(self, x: Tensor, cache: StepCache | None = None) -> Tensor:
        batch, length, channels = x.shape
        # B x L x 3C -> three B x heads x L x C/heads. Contiguous, because on the CPU a strided
        # layout sends attention to the slow reference kernel instead of the fused one.
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, channels // self.num_heads)
        q, k, v = (t.contiguous() for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))
        if cache is None:
            dropout = self.dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            if length != 1:
                raise ValueError(f"step mode attends from one position, got {length}")
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
        return self.out(out.transpose(1, 2).reshape(batch, length, channels))


class TransformerBlock(Recomputable):
    """Pre-norm block: x + attention(norm(x)), then x + mlp(norm(x)), dropout on each branch."""

    def __init__(self, config: TransformerPriorConfig) -> None:
        super().__init__()
        c = config.channels
        self.attention_norm = nn.LayerNorm(c)
        self.attention = CausalSelfAttention(c, config.num_heads, config.dropout)
        self.mlp_norm = nn.LayerNorm(c)
        self.mlp = nn.Sequential(
            nn.Linear(c, config.mlp_ratio * c), nn.GELU(), nn.Linear(config.mlp_ratio * c, c)
        )
        self.dropout = nn.Dropout(config.dropout)

    @recomputed
    def forward(self, x: Tensor, cache: StepCache | None = None) -> Tensor:
        x = x + self.dropout(self.attention(self.attention_norm(x), cache))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class TransformerPrior(CodePrior):
    """Decoder-only transformer prior: logits B x K x h x w over a code map, optionally
    conditioned on a class label and a coarser code map (both added to every position's
    input)."""

    config_class = TransformerPriorConfig

    def __init__(self, config: TransformerPriorConfig) -> None:
        super().__init__(config)
        c = config.channels
        # The input at position 0, where there is no code before.
        self.start_token = nn.Parameter(torch.zeros(c))
        self.class_embedding = None
        if config.num_classes > 0:
            self.class_embedding = nn.Embedding(class_rows(config), c)
        self.row_embedding = nn.Embedding(config.height, c)
        self.column_embedding = nn.Embedding(config.width, c)
        self.condition_projection = None
        if self.condition_stack is not None:
            self.condition_projection = nn.Linear(self.condition_channels, c, bias=False)
        self.input_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(c)
        self.head = nn.Linear(c, config.num_codes)
        self._init_weights()
        if config.tie_embeddings:
            self.head.weight = self.embedding.weight

    def _init_weights(self) -> None:
        # GPT-2's initialisation: N(0, 0.02) weights, zero biases, and the projections that write
        # into the residual stream scaled by 1/sqrt(2 * layers), so the stream's variance does not
        # grow with depth. The shared condition stack keeps its own (PyTorch's) initialisation.
        skip = set(self.condition_stack.modules()) if self.condition_stack is not None else set()
        for module in self.modules():
            if module in skip:
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.start_token, std=0.02)
        for block in self.blocks:
            for projection in (block.attention.out, block.mlp[-1]):
                nn.init.normal_(projection.weight, std=0.02 / math.sqrt(2 * len(self.blocks)))

    def _shared_inputs(self, context: PriorContext) -> Tensor | int:
        """What every position's input gets: the B x 1 x C class embedding (0 without classes)."""
        if self.class_embedding is None:
            return 0
        return self.class_embedding(context.labels)[:, None]

    def _sequence_inputs(self, x: Tensor, context: PriorContext) -> Tensor:
        """B x P x C inputs of a whole map from its B x C x h x w code embedding."""
        codes = x.flatten(2).transpose(1, 2)  # B x P x C, raster order
        # Shift right by one: position p reads the code at p - 1, position 0 the start token.
        start = self.start_token.expand(x.shape[0], 1, -1)
        h = torch.cat([start, codes[:, :-1]], dim=1)
        rows, cols = self.row_embedding.weight, self.column_embedding.weight
        h = h + (rows[:, None] + cols[None, :]).flatten(0, 1) + self._shared_inputs(context)
        if self.condition_projection is not None:
            h = h + self.condition_projection(context.condition.flatten(2).transpose(1, 2))
        return h

    def _step_inputs(self, context: PriorContext, cache: StepCache) -> Tensor:
        """B x 1 x C input at the cache's current position."""
        if cache.position == 0:
            h = self.start_token.expand(cache.batch, 1, -1)
        else:
            h = cache.store[(self, "previous")]  # the code observed at the position before
        h = h + self.row_embedding.weight[cache.row] + self.column_embedding.weight[cache.col]
        h = h + self._shared_inputs(context)
        if self.condition_projection is not None:
            features = context.condition[:, :, cache.row, cache.col]
            h = h + self.condition_projection(features)[:, None]
        return h

    def _network(
        self, x: Tensor | None, context: PriorContext, cache: StepCache | None = None
    ) -> Tensor:
        cfg = self.config
        if cache is None:
            h = self._sequence_inputs(x, context)
        else:
            h = self._step_inputs(context, cache)
        h = self.input_dropout(h)
        for block in self.blocks:
            h = block(h, cache)
        logits = self.head(self.norm(h)).transpose(1, 2)  # B x K x L
        if cache is None:
            return logits.reshape(logits.shape[0], cfg.num_codes, cfg.height, cfg.width)
        return logits[:, :, :, None]  # B x K x 1 x 1

    def observe(self, cache: StepCache, codes: Tensor) -> None:
        """Keep the embedding of the n codes just drawn: the next position's input. (The keys and
        values of the positions before are already in the attention layers' caches.)"""
        cache.store[(self, "previous")] = self.embedding(codes)[:, None]
        cache.observed += 1
