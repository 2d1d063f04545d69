"""The table of model kinds: one entry per model, read by configs, stages and checkpoints."""

from __future__ import annotations

import dataclasses

import pytest

from vq_core.checkpoint import MODEL_REGISTRY, model_class
from vq_core.kinds import KINDS, get_kind, kind_of_class, kinds_of, prior_fields


def test_every_kind_builds_its_class_from_its_config_class():
    for kind in KINDS.values():
        cls = kind.model_class
        assert cls.config_class is kind.config_class
        assert dataclasses.is_dataclass(kind.config_class)
        assert kind.derived <= kind.fields(), kind.name
        assert model_class(kind.class_name) is cls
    assert MODEL_REGISTRY == {k.class_name: k.target for k in KINDS.values()}


def test_roles():
    assert kinds_of("autoencoder") == ("vqvae2", "vqvae", "dvae")
    assert kinds_of("prior") == ("pixelsnail", "pixelcnn", "transformer")
    assert kind_of_class("PixelSNAIL").name == "pixelsnail"


def test_derived_fields_are_refused_from_users_and_unknown_ones_named():
    with pytest.raises(ValueError, match="model.num_codes is set by the pipeline"):
        get_kind("pixelsnail").check_user_fields({"num_codes": 3}, "model")
    with pytest.raises(ValueError, match="model.chanels is not a PixelSNAILConfig field"):
        get_kind("pixelsnail").check_user_fields({"chanels": 3}, "model")
    with pytest.raises(ValueError, match="unknown model kind 'pixelsnial'"):
        get_kind("pixelsnial")


def test_builder_fills_in_the_derived_fields():
    fields = prior_fields(16, (2, 3), num_classes=4, condition=(32, (1, 1)))
    prior = get_kind("pixelsnail").build({"channels": 8, "num_blocks": 1, "res_blocks": 1}, fields)
    config = prior.config
    assert (config.num_codes, config.height, config.width, config.num_classes) == (16, 2, 3, 4)
    assert (config.condition_num_codes, config.condition_height) == (32, 1)
    # One class carries no information: the prior is unconditional.
    assert prior_fields(16, (2, 3), num_classes=1)["num_classes"] == 0


def test_each_autoencoder_kind_declares_the_levels_its_model_encodes():
    import torch

    for name in kinds_of("autoencoder"):
        kind = get_kind(name)
        assert kind.levels == kind.model_class.levels, name
        params = {"channels": 8, "res_blocks": 1, "res_channels": 4, "embed_dim": 4}
        model = kind.build(params, {})
        codes = model.encode(torch.zeros(1, 3, 16, 16))
        assert len(codes) == len(kind.levels), name
        assert kind.levels_for(params) == kind.levels == model.levels, name


def test_a_vqvae2_configured_with_levels_has_those_levels_without_being_built():
    kind = get_kind("vqvae2")
    levels = [
        {"name": "top", "downsample": 2, "codebook_size": 8},
        {"name": "middle", "downsample": 2, "codebook_size": 8},
        {"name": "bottom", "downsample": 4, "codebook_size": 8},
    ]
    assert kind.levels_for({"levels": levels}) == ("top", "middle", "bottom")
    assert kind.levels_for({"levels": levels[:1]}) == ("top",)
    assert kind.levels_for({}) == ("top", "bottom")
    model = kind.build({"levels": levels, "channels": 8, "embed_dim": 4}, {})
    assert model.levels == kind.levels_for({"levels": levels})
    with pytest.raises(ValueError, match=r"levels\[1\]\.name 'top' is already"):
        kind.levels_for({"levels": [levels[0], levels[0]]})
    with pytest.raises(ValueError, match="pixelsnail.* is a prior; it has no code levels"):
        get_kind("pixelsnail").levels_for({})


def test_each_finer_level_is_conditioned_on_the_level_before_it():
    from vq_core.kinds import prior_conditions

    assert prior_conditions(("top", "bottom")) == {"top": None, "bottom": "top"}
    assert prior_conditions(("codes",)) == {"codes": None}
    with pytest.raises(ValueError, match=r"distinct code level names, got \['a', 'a'\]"):
        prior_conditions(["a", "a"])


def test_the_package_exports_load_on_first_use_and_the_table_needs_no_torch():
    """``from vq_core import VQVAE2`` works as for any package, while a process that reads only
    the table of kinds (a config being parsed, a Ray Data task) never imports torch."""
    import subprocess
    import sys

    import vq_core

    for name in vq_core.__all__:
        value = getattr(vq_core, name)
        assert value.__module__.startswith("vq_core."), name
        assert getattr(sys.modules[value.__module__], name) is value, name
    with pytest.raises(AttributeError, match="no attribute 'VQVAE3'"):
        vq_core.VQVAE3  # noqa: B018
    probe = (
        "import sys, vq_core, vq_core.kinds\n"
        "vq_core.kinds.get_kind('pixelsnail')\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
