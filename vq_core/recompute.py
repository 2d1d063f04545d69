"""Activation checkpointing: blocks that drop their activations after the forward pass and
recompute them during the backward pass.

At high resolution the activations autograd keeps, not the weights, decide whether a batch fits a
GPU (a 64x64 bottom prior keeps about a gigabyte per image in float32). A block that subclasses
``Recomputable`` and whose forward is decorated ``@recomputed`` keeps only its inputs when recomputing is
on, for one more forward pass of the block in backward (about a third more compute). The switch is
not part of the checkpoint format: ``set_activation_checkpointing(model, True)`` turns it on for
every such block of a built model, in training only (sampling and evaluation run without autograd
and are unaffected). Dropout masks are replayed exactly (the RNG state is saved and restored), so
the gradients are those of the plain forward pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class Recomputable(nn.Module):
    """A module with methods decorated ``@recomputed``: their bodies can be recomputed in backward
    instead of kept."""

    recompute: bool = False  # set per instance by set_activation_checkpointing


def recomputed(method: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a ``Recomputable``'s forward (or another method its parent calls) so that, when
    recomputing is on and autograd records (training, not sampling), it runs under activation
    checkpointing."""

    @functools.wraps(method)
    def wrapper(self: Recomputable, *args: Any, **kwargs: Any) -> Any:
        if self.recompute and self.training and torch.is_grad_enabled():
            return checkpoint(method, self, *args, use_reentrant=False, **kwargs)
        return method(self, *args, **kwargs)

    return wrapper


def set_activation_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Turn recomputation on (or off) for the outermost ``Recomputable`` blocks of ``model``;
    returns how many blocks now recompute. A model without any such block raises, rather than
    silently saving nothing."""
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, Recomputable)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no blocks that support recomputation")
    outer: list[str] = []
    for name, block in blocks:  # parents come before their children
        # A block inside a recomputed block is recomputed with it; recomputing it again on its
        # own would only repeat the work.
        nested = any(name.startswith(prefix + ".") for prefix in outer)
        block.recompute = bool(enabled) and not nested
        if block.recompute:
            outer.append(name)
    return len(outer)
