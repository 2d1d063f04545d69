"""Sampling code maps from an autoregressive prior, one position at a time.

A prior factorises p(codes) = prod_p p(code_p | codes before p) in raster order, so a sample is
drawn position by position. Two procedures produce the same samples:

- ``method="naive"``, the reference: one full forward pass per position, h*w passes over the
  whole h x w map (1,024 for a 32x32 map). Slow, but obviously right.
- ``method="cached"``: the same network run in *step mode*. Every spatial op (causal
  convolution, attention, positional and condition features) computes only the current row or
  position, reading what earlier steps left in a per-layer ``StepCache``; pointwise ops work on
  B x C x 1 x 1 (or 1 x W) tensors unchanged. Each model's forward is therefore written once and
  serves training, naive sampling and cached sampling, and each step costs one position's work.

This module holds what the priors share: logit filtering, a seeded categorical draw, the step
cache, the step-capable causal convolution, the sampling loop, and the loop over the levels of a
hierarchy (``sample_levels``: each level's prior conditioned on the codes drawn above it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vq_core.kinds import DEFAULT_SAMPLING_METHOD, SAMPLING_METHODS

# (row_start, row_stop, col_start, col_stop): the part of the map a step computes.
Region = tuple[int, int, int, int]

METHODS = SAMPLING_METHODS
DEFAULT_METHOD = DEFAULT_SAMPLING_METHOD


def crop(t: Tensor, region: Region | None) -> Tensor:
    """The part of a B x C x H x W map inside `region`; per-image values (... x 1 x 1) broadcast
    to every position and pass through unchanged, as does everything when region is None."""
    if region is None or t.shape[-2:] == (1, 1):
        return t
    r0, r1, c0, c1 = region
    return t[..., r0:r1, c0:c1]


class StepCache:
    """What incremental sampling keeps between steps: per-layer buffers keyed by module.

    Steps must visit positions in raster order. At a step, ``row_region`` is the whole current
    row (the vertical stacks, whose features at row i depend only on rows < i, compute a row at
    a time, on the row's first step) and ``position_region`` is the single current position.
    """

    def __init__(self, batch: int, height: int, width: int, context: Any = None) -> None:
        self.batch, self.height, self.width = batch, height, width
        self.context = context
        self.row = 0
        self.col = 0
        self.observed = 0  # positions whose codes the layers have been given
        self.store: dict[Any, Any] = {}

    @property
    def position(self) -> int:
        return self.row * self.width + self.col

    @property
    def row_region(self) -> Region:
        return (self.row, self.row + 1, 0, self.width)

    @property
    def position_region(self) -> Region:
        return (self.row, self.row + 1, self.col, self.col + 1)

    def column(self, row_features: Tensor) -> Tensor:
        """The current column of a B x C x 1 x W row computed on this row's first step."""
        return row_features[..., self.col : self.col + 1]


class PointwiseConv(nn.Conv2d):
    """A 1x1 convolution. On a single position (B x C x 1 x 1, as in sampling steps) it runs as a
    matrix product, which is several times cheaper than a convolution call at that size. It takes
    (and ignores) the causal layers' cache and region, so blocks can use either kind."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(
        self, x: Tensor, cache: StepCache | None = None, region: Region | None = None
    ) -> Tensor:
        if x.shape[-2:] == (1, 1):
            return F.linear(x.flatten(1), self.weight.flatten(1), self.bias)[:, :, None, None]
        return super().forward(x)


class CausalConv2d(nn.Conv2d):
    """A convolution whose output at (i, j) reads a fixed causal footprint of its input.

    With kernel (kh, kw) the footprints are (rows, columns read for output (i, j)):

      "vertical_strict"    i-kh .. i-1      j-kw//2 .. j+kw//2   first layer of a vertical stack
      "vertical"           i-kh+1 .. i      j-kw//2 .. j+kw//2   later vertical layers
      "horizontal_strict"  i-kh+1 .. i      j-kw .. j-1          first layer of a horizontal stack
      "horizontal"         i-kh+1 .. i      j-kw+1 .. j          later horizontal layers

    "vertical" reads row i to the right of j, so it may only be applied to features that depend on
    rows < i alone (a vertical stack); the strict forms are the "mask A" layers that read the codes
    themselves. Zero padding on the top/left (and cropping on the bottom/right, as negative padding)
    realises each footprint with an ordinary convolution, so there are no masked weights.

    In step mode the layer keeps its zero-padded input in a buffer of the padded map's size: a step
    writes the new input region (if any) and convolves just the window the output region needs.
    """

    FOOTPRINTS = ("vertical_strict", "vertical", "horizontal_strict", "horizontal")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        footprint: str,
    ) -> None:
        kh, kw = kernel_size
        if footprint not in self.FOOTPRINTS:
            raise ValueError(f"footprint must be one of {self.FOOTPRINTS}, got {footprint!r}")
        if footprint.startswith("vertical") and kw % 2 == 0:
            raise ValueError(f"a {footprint} convolution needs an odd kernel width, got {kw}")
        super().__init__(in_channels, out_channels, (kh, kw))
        self.footprint = footprint
        # F.pad order: (left, right, top, bottom); left+right == kw-1 and top+bottom == kh-1 keep
        # the output the size of the input.
        self.pad = {
            "vertical_strict": (kw // 2, kw // 2, kh, -1),
            "vertical": (kw // 2, kw // 2, kh - 1, 0),
            "horizontal_strict": (kw, -1, kh - 1, 0),
            "horizontal": (kw - 1, 0, kh - 1, 0),
        }[footprint]

    def forward(
        self, x: Tensor | None, cache: StepCache | None = None, region: Region | None = None
    ) -> Tensor:
        if cache is None:
            return super().forward(F.pad(x, self.pad))
        buffer = self._buffer(cache)
        if x is not None:
            self._write(buffer, x, region)
        kh, kw = self.kernel_size
        r0, r1, c0, c1 = region
        window = buffer[:, :, r0 : r1 + kh - 1, c0 : c1 + kw - 1]
        if r1 - r0 == 1 and c1 - c0 == 1:
            # One output position is one matrix product; a convolution call costs several times
            # more for inputs this small, and this runs once per layer per sampling step.
            out = F.linear(window.reshape(cache.batch, -1), self.weight.flatten(1), self.bias)
            return out[:, :, None, None]
        return F.conv2d(window, self.weight, self.bias)

    def write(self, x: Tensor, cache: StepCache, region: Region) -> None:
        """Store this layer's input at `region` without computing anything: how a strict (mask A)
        layer learns the code sampled at a position, which it reads from the next step on."""
        self._write(self._buffer(cache), x, region)

    def _buffer(self, cache: StepCache) -> Tensor:
        buffer = cache.store.get(self)
        if buffer is None:
            kh, kw = self.kernel_size
            shape = (cache.batch, self.in_channels, cache.height + kh - 1, cache.width + kw - 1)
            buffer = self.weight.new_zeros(shape)
            cache.store[self] = buffer
        return buffer

    def _write(self, buffer: Tensor, x: Tensor, region: Region) -> None:
        left, _, top, _ = self.pad
        r0, r1, c0, c1 = region
        # Inputs that fall in the cropped last row/column are never read: drop them.
        rows = min(r1 + top, buffer.shape[-2]) - (r0 + top)
        cols = min(c1 + left, buffer.shape[-1]) - (c0 + left)
        if rows > 0 and cols > 0:
            buffer[:, :, r0 + top : r0 + top + rows, c0 + left : c0 + left + cols] = x[
                :, :, :rows, :cols
            ]


def check_filter_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError naming the first bad sampling setting."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1
    ):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def check_guidance(guidance: float) -> None:
    """Raise ValueError unless `guidance` is a finite number >= 0."""
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
        raise ValueError(f"guidance must be a number >= 0, got {guidance!r}")
    if not (guidance >= 0 and math.isfinite(guidance)):
        raise ValueError(f"guidance must be a finite number >= 0, got {guidance!r}")


def guided_batch(
    prior: nn.Module, labels: Tensor | None, condition: Tensor | None, guidance: float
) -> tuple[Tensor, Tensor | None]:
    """The labels and condition of a classifier-free guided draw: the n samples twice, first with
    their labels, then with the prior's "no class" label. ValueError naming the guidance when the
    prior has no such label (it is unconditional, or was trained without label dropout)."""
    null = getattr(prior, "null_label", None)
    if labels is None or null is None:
        why = (
            "is unconditional (num_classes=0)"
            if labels is None
            else "was trained without label dropout (label_dropout=0), so it has no "
            "'no class' label to contrast the class with"
        )
        raise ValueError(
            f"guidance={guidance} needs a class-conditional prior trained with label_dropout > 0; "
            f"this prior {why}. Sample with guidance=1.0, or train the prior with label_dropout "
            "(0.1 is usual)"
        )
    both = torch.cat([labels, torch.full_like(labels, null)])
    return both, None if condition is None else torch.cat([condition, condition])


def filter_logits(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Tensor:
    """Temperature-scale N x K logits, then keep the `top_k` most likely codes and the smallest
    set holding `top_p` of the probability (nucleus); the rest get -inf. The most likely code is
    always kept, so top_k=1 or a tiny top_p is greedy decoding."""
    check_filter_args(temperature, top_k, top_p)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_best = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_best, -math.inf)
    if top_p is not None and top_p < 1.0:
        ranked, order = logits.sort(dim=-1, descending=True)
        probs = ranked.softmax(dim=-1)
        # Drop a code once the codes ranked above it already hold top_p of the mass.
        drop_ranked = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.empty_like(drop_ranked).scatter_(-1, order, drop_ranked)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


def draw_categorical(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One code per row of N x K logits, by the Gumbel-max trick: argmax(logits + Gumbel noise).

    The noise comes from `generator` on the generator's own device (then moves to the logits'),
    so a seeded draw is reproducible and does not depend on where the model runs. Codes whose
    logit is -inf are never drawn."""
    device = logits.device if generator is None else generator.device
    uniform = torch.rand(logits.shape, generator=generator, device=device).to(logits.device)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(uniform.dtype).tiny)))
    return (logits.float() + gumbel).argmax(dim=-1)


@torch.inference_mode()
def sample_codes(
    prior: nn.Module,
    n: int,
    labels: Tensor | None = None,
    condition: Tensor | None = None,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    method: str = DEFAULT_METHOD,
    return_logits: bool = False,
    guidance: float = 1.0,
) -> Tensor | tuple[Tensor, Tensor]:
    """Draw n code maps (n x h x w long) from `prior` in raster order.

    `guidance` other than 1 is classifier-free guidance (Ho & Salimans 2022): each step's logits
    become u + guidance * (c - u), c the class-conditional logits and u those of the prior's "no
    class" label, which a prior trained with label dropout has. guidance > 1 sharpens the draw
    towards what sets the class apart, 0 ignores the class; 1 (the default) is the plain
    class-conditional draw, and only it runs one pass per step instead of two (the conditional
    and unconditional batches run as one batch of 2n).

    `prior` is a vq_core prior: called as prior(codes, labels, condition) for logits, and
    providing the step protocol check_conditioning / begin_sampling / sampling_step / observe.

    Both methods consume the generator identically, so with the same seed and weights they
    return the same codes. With return_logits=True also return the unfiltered logits the prior
    gave at every step, n x (h*w) x K float32 in raster order, to compare the two procedures.
    The prior runs in eval mode (dropout off) and gets its previous mode back afterwards.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (the number of samples) must be an integer >= 1, got {n!r}")
    check_filter_args(temperature, top_k, top_p)
    check_guidance(guidance)
    labels, condition = prior.check_conditioning(labels, condition, n)
    guided = guidance != 1
    if guided:
        labels, condition = guided_batch(prior, labels, condition, guidance)
    batch = 2 * n if guided else n
    height, width = prior.config.height, prior.config.width
    device = next(iter(prior.parameters())).device

    was_training = prior.training
    prior.eval()
    try:
        codes = torch.zeros(batch, height, width, dtype=torch.long, device=device)
        cache = prior.begin_sampling(batch, labels, condition) if method == "cached" else None
        step_logits = []
        for row in range(height):
            for col in range(width):
                if cache is None:
                    logits = prior(codes, labels, condition)[:, :, row, col]
                else:
                    logits = prior.sampling_step(cache, row, col)
                if guided:
                    conditional, unconditional = logits.float().chunk(2)
                    logits = unconditional + guidance * (conditional - unconditional)
                drawn = draw_categorical(
                    filter_logits(logits, temperature, top_k, top_p), generator
                )
                if guided:
                    drawn = drawn.repeat(2)  # both halves continue from the same code
                codes[:, row, col] = drawn
                if cache is not None:
                    prior.observe(cache, drawn)
                if return_logits:
                    step_logits.append(logits.float())
    finally:
        prior.train(was_training)
    if return_logits:
        return codes[:n], torch.stack(step_logits, dim=1)
    return codes[:n]


def sample_levels(
    priors: Sequence[tuple[str, str | None, nn.Module]],
    n: int,
    labels: Tensor | None = None,
    *,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    generator: torch.Generator | None = None,
    method: str = DEFAULT_METHOD,
) -> dict[str, Tensor]:
    """Draw n code maps per level of a hierarchy, top down: {level: n x h x w long}.

    ``priors`` lists (level, condition level or None, prior) in sampling order, each prior's
    condition level before it: the top prior sees the class only, every other one also the codes
    just drawn for its condition level (VQ-VAE-2: top, then bottom given top; any depth alike).
    ``labels`` go to the priors that are class-conditional. ``settings`` gives each level's
    temperature, top_k, top_p and guidance (a level not in it draws with the defaults). The levels
    draw from ``generator`` one after the other, so a seed fixes the whole hierarchy, and each
    level draws exactly what ``sample_codes`` draws for it with either method.
    """
    settings = settings or {}
    unknown = sorted(set(settings) - {level for level, _, _ in priors})
    if unknown:
        raise ValueError(f"sampling settings for unknown level(s) {unknown}")
    codes: dict[str, Tensor] = {}
    for level, condition, prior in priors:
        if level in codes:
            raise ValueError(f"level {level!r} is listed twice")
        if condition is not None and condition not in codes:
            raise ValueError(
                f"the {level} prior is conditioned on {condition!r}, which is not drawn before it "
                f"(drawn so far: {list(codes)})"
            )
        codes[level] = sample_codes(
            prior,
            n,
            labels=labels if prior.config.num_classes > 0 else None,
            condition=codes[condition] if condition is not None else None,
            generator=generator,
            method=method,
            **settings.get(level, {}),
        )
    return codes
