"""Sampling a hierarchy of any depth (``sample_levels``): top down, each level conditioned on the
codes drawn for the level above it, each with its own settings, the cached sampler drawing exactly
what the naive reference draws at every level."""

from __future__ import annotations

import pytest
import torch

from vq_core.pixelcnn import GatedPixelCNN, GatedPixelCNNConfig
from vq_core.pixelsnail import PixelSNAIL, PixelSNAILConfig
from vq_core.sampling import sample_codes, sample_levels
from vq_core.transformer import TransformerPrior, TransformerPriorConfig

CLASSES = 3
# (level, codebook size, map side, condition level): three levels, each map twice the side of the
# one above it, as a VQ-VAE-2 with levels top, middle, bottom gives them.
LEVELS = (("top", 5, 2, None), ("middle", 6, 4, "top"), ("bottom", 7, 8, "middle"))


def hierarchy(kind: str = "pixelsnail") -> list[tuple[str, str | None, torch.nn.Module]]:
    """(level, condition level, prior) of three small priors, each conditioned on the class and
    the level above it; dropout on, so that the samplers must switch it off alike."""
    torch.manual_seed(0)
    sizes = {level: (k, side) for level, k, side, _ in LEVELS}
    priors = []
    for level, k, side, condition in LEVELS:
        fields = dict(num_classes=CLASSES, condition_channels=8)
        if condition is not None:
            codes, cond_side = sizes[condition]
            fields |= dict(
                condition_num_codes=codes, condition_height=cond_side, condition_width=cond_side
            )
        if kind == "pixelsnail":
            prior = PixelSNAIL(
                PixelSNAILConfig(
                    k,
                    side,
                    side,
                    channels=16,
                    num_blocks=1,
                    res_blocks=1,
                    # The top level with attention, the ones below without, as the pipeline's
                    # defaults have it.
                    attention=condition is None,
                    num_heads=2,
                    attention_channels=8,
                    dropout=0.1,
                    condition_res_blocks=1,
                    **fields,
                )
            )
        elif kind == "transformer":
            prior = TransformerPrior(
                TransformerPriorConfig(
                    k, side, side, channels=16, num_layers=1, num_heads=2, dropout=0.1,
                    condition_res_blocks=1, **fields,
                )
            )  # fmt: skip
        else:
            prior = GatedPixelCNN(
                GatedPixelCNNConfig(k, side, side, channels=16, num_layers=2, **fields)
            )
        priors.append((level, condition, prior))
    return priors


def labels(n: int = 3) -> torch.Tensor:
    return torch.arange(n) % CLASSES


@pytest.mark.parametrize("kind", ["pixelsnail", "pixelcnn", "transformer"])
def test_cached_sampling_matches_naive_at_every_level_of_three(kind):
    priors = hierarchy(kind)
    drawn = {}
    for method in ("naive", "cached"):
        generator = torch.Generator().manual_seed(11)
        drawn[method] = sample_levels(priors, 3, labels(), generator=generator, method=method)
    for level, k, side, _ in LEVELS:
        naive, cached = drawn["naive"][level], drawn["cached"][level]
        assert naive.shape == (3, side, side) and naive.dtype == torch.long, level
        assert torch.equal(cached, naive), level
        assert 0 <= int(naive.min()) and int(naive.max()) < k, level
        assert naive.unique().numel() > 1, level  # the draws varied
    # Given the same codes above, each level's prior gives the same logits both ways at every
    # step, not only the same draws.
    codes = drawn["naive"]
    for level, condition, prior in priors:
        above = codes[condition] if condition else None
        logits = {}
        for method in ("naive", "cached"):
            generator = torch.Generator().manual_seed(5)
            _, logits[method] = sample_codes(
                prior, 3, labels(), above, generator=generator, method=method, return_logits=True
            )
        assert torch.allclose(logits["cached"], logits["naive"], atol=1e-4, rtol=0), level


def test_each_level_is_drawn_given_the_codes_drawn_above_it():
    priors = hierarchy()
    generator = torch.Generator().manual_seed(3)
    codes = sample_levels(priors, 3, labels(), generator=generator)
    # Replaying the levels one by one, with the generator in the same state, draws the same maps:
    # the middle prior read the top codes just drawn, the bottom prior the middle ones.
    generator = torch.Generator().manual_seed(3)
    replayed: dict[str, torch.Tensor] = {}
    for level, condition, prior in priors:
        replayed[level] = sample_codes(
            prior,
            3,
            labels(),
            replayed[condition] if condition else None,
            generator=generator,
        )
        assert torch.equal(replayed[level], codes[level]), level
    # Other codes above give other codes below, for the same generator state.
    middle = priors[1][2]
    other_top = (codes["top"] + 1) % LEVELS[0][1]
    state = torch.Generator().manual_seed(99)
    again = torch.Generator().manual_seed(99)
    first = sample_codes(middle, 3, labels(), codes["top"], generator=state)
    second = sample_codes(middle, 3, labels(), other_top, generator=again)
    assert not torch.equal(first, second)


def test_each_level_draws_with_its_own_settings():
    priors = hierarchy()
    greedy = {"middle": {"top_k": 1}}
    generator = torch.Generator().manual_seed(4)
    codes = sample_levels(priors, 3, labels(), settings=greedy, generator=generator)
    # top_k=1 at the middle level: each middle code is the argmax of its logits given the codes
    # before it (the prior is causal, so the full map's logits are those the sampler saw; in eval
    # mode, as it samples).
    for _, _, prior in priors:
        prior.eval()
    middle = priors[1][2]
    with torch.no_grad():
        logits = middle(codes["middle"], labels(), codes["top"])
    assert torch.equal(logits.argmax(dim=1), codes["middle"])
    # The other levels drew at temperature 1: not greedy.
    top = priors[0][2]
    with torch.no_grad():
        top_logits = top(codes["top"], labels())
    bottom = priors[2][2]
    with torch.no_grad():
        bottom_logits = bottom(codes["bottom"], labels(), codes["middle"])
    assert not torch.equal(bottom_logits.argmax(dim=1), codes["bottom"])
    assert top_logits.shape == (3, LEVELS[0][1], 2, 2)


def test_a_level_drawn_before_its_condition_or_unknown_settings_are_refused():
    top, middle, bottom = hierarchy()
    with pytest.raises(ValueError, match=r"the middle prior is conditioned on 'top', which is not"):
        sample_levels([middle, top, bottom], 2, labels(2))
    with pytest.raises(ValueError, match=r"settings for unknown level\(s\) \['lowest'\]"):
        sample_levels([top, middle, bottom], 2, labels(2), settings={"lowest": {"top_k": 1}})
    with pytest.raises(ValueError, match="level 'top' is listed twice"):
        sample_levels([top, top], 2, labels(2))


def test_labels_go_to_the_class_conditional_levels_only():
    # A one-class top prior (a corpus of a single class still has labels) over an unconditional
    # bottom one: the labels reach the top prior, and the bottom one, which refuses labels, gets
    # none.
    torch.manual_seed(0)
    top = GatedPixelCNN(GatedPixelCNNConfig(5, 2, 2, channels=8, num_layers=1, num_classes=1))
    bottom = GatedPixelCNN(
        GatedPixelCNNConfig(
            6, 4, 4, channels=8, num_layers=1, condition_num_codes=5, condition_height=2,
            condition_width=2, condition_channels=8, condition_res_blocks=1,
        )
    )  # fmt: skip
    only_class = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="unconditional"):
        sample_codes(bottom, 2, only_class, torch.zeros(2, 2, 2))
    codes = sample_levels(
        [("top", None, top), ("bottom", "top", bottom)],
        2,
        only_class,
        generator=torch.Generator().manual_seed(1),
    )
    generator = torch.Generator().manual_seed(1)
    first = sample_codes(top, 2, only_class, generator=generator)
    second = sample_codes(bottom, 2, None, first, generator=generator)
    assert torch.equal(codes["top"], first) and torch.equal(codes["bottom"], second)
