"""Classifier-free guidance: label dropout in training (a "no class" label the prior learns too)
and guided sampling, u + guidance * (c - u) over the unconditional and class-conditional logits,
for every prior kind, with the cached sampler drawing what the naive one draws."""

from __future__ import annotations

import math

import pytest
import torch

from vq_core.checkpoint import load_checkpoint, save_checkpoint
from vq_core.pixelcnn import GatedPixelCNN, GatedPixelCNNConfig
from vq_core.pixelsnail import PixelSNAIL, PixelSNAILConfig
from vq_core.sampling import sample_codes, sample_levels
from vq_core.transformer import TransformerPrior, TransformerPriorConfig

K, H, W, CLASSES = 7, 4, 5, 3
CONDITION = dict(condition_num_codes=5, condition_height=2, condition_width=5)


def prior(
    kind: str, label_dropout: float = 0.1, dropout: float = 0.1, shape=(K, H, W), **overrides
):
    """A small prior of ``kind`` over H x W maps, conditioned on the class and a coarser map."""
    torch.manual_seed(0)
    fields = dict(num_classes=CLASSES, label_dropout=label_dropout, condition_channels=8)
    fields |= CONDITION | overrides
    if kind == "pixelsnail":
        config = PixelSNAILConfig(
            *shape, channels=16, num_blocks=1, res_blocks=1, num_heads=2, attention_channels=8,
            dropout=dropout, condition_res_blocks=1, **fields,
        )  # fmt: skip
        return PixelSNAIL(config)
    if kind == "transformer":
        config = TransformerPriorConfig(
            *shape, channels=16, num_layers=2, num_heads=2, dropout=dropout,
            condition_res_blocks=1, **fields,
        )  # fmt: skip
        return TransformerPrior(config)
    return GatedPixelCNN(GatedPixelCNNConfig(*shape, channels=16, num_layers=3, **fields))


KINDS = ("pixelcnn", "pixelsnail", "transformer")
LABELS = torch.tensor([0, 1, 2, 1])


def condition(n: int = len(LABELS)) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, CONDITION["condition_num_codes"], (n, 2, 5), generator=g)


def draw(model, labels=LABELS, guidance=1.0, method="cached", seed=5, **settings):
    return sample_codes(
        model,
        len(labels),
        labels,
        condition(len(labels)),
        guidance=guidance,
        method=method,
        generator=torch.Generator().manual_seed(seed),
        return_logits=True,
        **settings,
    )


@pytest.mark.parametrize("kind", KINDS)
def test_guided_logits_are_the_unconditional_plus_guidance_times_the_difference(kind):
    model = prior(kind)
    for name, parameter in model.named_parameters():
        if "class_embedding" in name:
            # A freshly built class embedding barely moves the logits; make the class matter.
            torch.nn.init.normal_(parameter, std=3.0)
    codes, logits = draw(model, guidance=2.5)
    # Recomputed independently: two full forward passes over the drawn codes, one with the
    # labels and one with the "no class" label (the prior is causal, so the logits at a position
    # are those the sampler saw when it drew that position).
    model.eval()
    with torch.no_grad():
        c = model(codes, LABELS, condition()).flatten(2).transpose(1, 2)
        u = model(codes, torch.full_like(LABELS, CLASSES), condition()).flatten(2).transpose(1, 2)
    assert torch.allclose(logits, u + 2.5 * (c - u), atol=1e-4, rtol=0)
    # Guidance changed the logits: they are not the class-conditional ones.
    assert (logits - c).abs().max() > 0.1


@pytest.mark.parametrize("kind", KINDS)
def test_guided_cached_sampling_draws_what_naive_draws(kind):
    model = prior(kind)
    cached_codes, cached_logits = draw(model, guidance=3.0, method="cached")
    naive_codes, naive_logits = draw(model, guidance=3.0, method="naive")
    assert cached_codes.shape == (len(LABELS), H, W)
    assert torch.allclose(cached_logits, naive_logits, atol=1e-4, rtol=0)
    assert torch.equal(cached_codes, naive_codes)


@pytest.mark.parametrize("kind", KINDS)
def test_guidance_zero_draws_what_the_no_class_label_draws(kind):
    model = prior(kind)
    assert model.null_label == CLASSES
    unguided, _ = draw(model, labels=torch.full_like(LABELS, CLASSES), guidance=1.0)
    ignoring_the_class, _ = draw(model, labels=LABELS, guidance=0.0)
    assert torch.equal(ignoring_the_class, unguided)
    with_the_class, _ = draw(model, labels=LABELS, guidance=1.0)
    assert not torch.equal(with_the_class, unguided)


def test_guidance_goes_to_each_level_of_a_hierarchy_through_its_settings():
    no_map = dict(condition_num_codes=0, condition_height=0, condition_width=0)
    top = prior("pixelsnail", shape=(5, 2, 5), **no_map)  # the map the bottom one reads
    bottom = prior("transformer")
    levels = [("top", None, top), ("bottom", "top", bottom)]

    def sample(settings):
        generator = torch.Generator().manual_seed(3)
        return sample_levels(levels, 4, LABELS, settings=settings, generator=generator)

    plain = sample({})
    bottom_guided = sample({"bottom": {"guidance": 4.0}})
    # The top level draws first and alike; only the bottom level's codes move.
    assert torch.equal(bottom_guided["top"], plain["top"])
    assert not torch.equal(bottom_guided["bottom"], plain["bottom"])


@pytest.mark.parametrize("kind", KINDS)
def test_label_dropout_replaces_labels_with_no_class_in_training_only(kind):
    model = prior(kind, label_dropout=0.5, dropout=0.0)
    n = 2000
    codes = torch.randint(0, K, (1, H, W)).expand(n, -1, -1)
    cond = condition(1).expand(n, -1, -1)
    labels = torch.zeros(n, dtype=torch.long)
    model.eval()
    with torch.no_grad():
        with_label = model(codes[:1], labels[:1], cond[:1])
        no_class = model(codes[:1], torch.tensor([CLASSES]), cond[:1])
        expected = with_label.expand(n, -1, -1, -1)
        assert torch.allclose(model(codes, labels, cond), expected, atol=1e-5)
        model.train()
        torch.manual_seed(0)
        trained = model(codes, labels, cond)
    as_labelled = (trained - with_label).flatten(1).abs().amax(1) < 1e-5
    as_no_class = (trained - no_class).flatten(1).abs().amax(1) < 1e-5
    # Each image saw either its label or "no class", never anything else.
    assert torch.all(as_labelled ^ as_no_class)
    # About half dropped: 1,000 expected, binomial standard deviation about 22.
    assert abs(int(as_no_class.sum()) - n // 2) < 5 * math.sqrt(n * 0.25)


def test_a_prior_without_label_dropout_has_no_no_class_label_and_refuses_guidance():
    model = prior("pixelsnail", label_dropout=0.0)
    assert model.null_label is None
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        model(torch.zeros(1, H, W, dtype=torch.long), torch.tensor([CLASSES]), condition(1))
    with pytest.raises(ValueError, match=r"guidance=2\.0 needs .*label_dropout=0"):
        draw(model, guidance=2.0)
    # guidance 1 is the plain draw, which every class-conditional prior makes.
    codes, _ = draw(model, guidance=1.0)
    assert codes.shape == (len(LABELS), H, W)


def test_an_unconditional_prior_ignores_label_dropout_and_refuses_guidance():
    model = prior("pixelcnn", num_classes=0, label_dropout=0.1, **{"condition_num_codes": 0})
    assert model.null_label is None
    assert not any("class_embedding" in name for name, _ in model.named_parameters())
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"guidance=1\.5 needs .*unconditional"):
        sample_codes(model, 2, guidance=1.5, generator=generator)


@pytest.mark.parametrize("guidance", [-0.5, math.nan, math.inf, "2", True])
def test_bad_guidance_values_are_refused_and_named(guidance):
    with pytest.raises(ValueError, match=f"guidance must be a .*number >= 0, got {guidance!r}"):
        draw(prior("pixelcnn"), guidance=guidance)


@pytest.mark.parametrize("label_dropout", [-0.1, 1.0, "0.1", None])
@pytest.mark.parametrize("kind", KINDS)
def test_bad_label_dropout_is_refused_and_named(kind, label_dropout):
    with pytest.raises(ValueError, match=r"Config\.label_dropout must be"):
        prior(kind, label_dropout=label_dropout)


@pytest.mark.parametrize("kind", KINDS)
def test_a_checkpoint_keeps_the_no_class_label(kind, tmp_path):
    model = prior(kind, label_dropout=0.2)
    save_checkpoint(model, tmp_path / "prior.pt")
    loaded, _ = load_checkpoint(tmp_path / "prior.pt")
    assert loaded.config.label_dropout == 0.2 and loaded.null_label == CLASSES
    assert torch.equal(draw(loaded, guidance=2.0)[0], draw(model, guidance=2.0)[0])
