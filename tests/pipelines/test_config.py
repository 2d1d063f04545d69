"""The configuration schema: what a user writes, what they get back when it is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines.config import ConfigError, load_config, parse_config
from pipelines.data import storage

REPO = Path(__file__).resolve().parents[2]


def minimal(**extra):
    return {"output_dir": "out", "data": {"source": "images"}, **extra}


def test_defaults_fill_every_section():
    cfg = parse_config(minimal())
    assert cfg.data.size_hw == (64, 64)
    assert cfg.train_vqvae.kind == "vqvae2"
    assert cfg.train_prior.bottom.model == {"attention": False}
    assert storage.join(cfg.output_dir, "tokenize").endswith("out/tokenize")


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    load_config(path)


def test_prior_sections_follow_the_autoencoder_levels():
    cfg = parse_config(
        minimal(train_vqvae={"kind": "vqvae"}, train_prior={"codes": {"kind": "pixelcnn"}})
    )
    assert cfg.train_prior.for_level("codes").kind == "pixelcnn"
    # A two-level section under a one-level kind would be ignored: refused, naming the fix.
    with pytest.raises(
        ConfigError,
        match=r"train_prior\.top configures a prior for code level 'top', but train_vqvae\.kind "
        r"'dvae' has levels \['codes'\]; configure train_prior\.codes instead",
    ):
        parse_config(minimal(train_vqvae={"kind": "dvae"}, train_prior={"top": {"steps": 3}}))
    with pytest.raises(ConfigError, match=r"train_prior\.codes .* has levels \['top', 'bottom'\]"):
        parse_config(minimal(train_prior={"codes": {"steps": 3}}))


def test_a_transformer_prior_at_every_level_keeps_its_model_as_written():
    # The bottom level's no-attention default is PixelSNAIL's alone: a transformer's model keeps
    # the fields written, and a PixelSNAIL field is refused, naming the transformer's.
    model = {"channels": 32, "num_layers": 2, "num_heads": 4}
    cfg = parse_config(
        minimal(
            train_prior={
                "top": {"kind": "transformer", "model": model},
                "bottom": {"kind": "transformer", "model": model},
            }
        )
    )
    for level in ("top", "bottom"):
        section = cfg.train_prior.for_level(level)
        assert (section.kind, section.model) == ("transformer", model)
    bad = {"codes": {"kind": "transformer", "model": {"attention": False}}}
    with pytest.raises(
        ConfigError, match=r"model\.attention is not a TransformerPriorConfig field.*num_layers"
    ):
        parse_config(minimal(train_vqvae={"kind": "dvae"}, train_prior=bad))


@pytest.mark.parametrize("kind", ["vqvae2", "vqvae", "dvae"])
def test_a_resolved_config_reads_back(kind):
    """The resolved config (every section, defaults included), as `vqpipe validate` shows it and
    runs log it, is itself a valid config."""
    cfg = parse_config(minimal(train_vqvae={"kind": kind}))
    assert parse_config(cfg.model_dump(mode="json")) == cfg


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"train_vqvae\.stepz: unknown key"):
        parse_config(minimal(train_vqvae={"stepz": 3}))


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match=r"tokenise: unknown key"):
        parse_config(minimal(tokenise={}))


def test_bad_value_names_key_and_value():
    with pytest.raises(ConfigError, match=r"train_vqvae\.steps: .*greater than 0.*got -5"):
        parse_config(minimal(train_vqvae={"steps": -5}))


def test_image_size_must_divide_by_8():
    with pytest.raises(ConfigError, match=r"data\.image_size.*multiples of 8, got 30"):
        parse_config({"output_dir": "o", "data": {"source": "s", "image_size": 30}})


def test_old_holdout_fraction_names_the_keys_that_replace_it():
    with pytest.raises(ConfigError) as err:
        parse_config({"output_dir": "o", "data": {"source": "s", "holdout_fraction": 0.1}})
    message = str(err.value)
    assert "data.holdout_fraction" in message and "0.1" in message
    assert "data.validation_fraction" in message and "data.test_fraction" in message


def test_split_fractions_must_leave_training_data():
    cfg = parse_config(
        minimal(data={"source": "s", "validation_fraction": 0.1, "test_fraction": 0})
    )
    assert (cfg.data.validation_fraction, cfg.data.test_fraction) == (0.1, 0.0)
    with pytest.raises(ConfigError, match=r"validation_fraction \(0.6\) \+ data.test_fraction"):
        parse_config(
            minimal(data={"source": "s", "validation_fraction": 0.6, "test_fraction": 0.4})
        )


def test_missing_source_is_named():
    with pytest.raises(ConfigError, match=r"data\.source: Field required"):
        parse_config({"output_dir": "o", "data": {}})


def test_unknown_model_field_lists_the_valid_ones():
    with pytest.raises(
        ConfigError, match=r"train_vqvae\.model\.chanels is not a VQVAE2Config field.*channels"
    ):
        parse_config(minimal(train_vqvae={"model": {"chanels": 3}}))


def test_model_value_checked_by_the_model_config():
    with pytest.raises(ConfigError, match=r"train_vqvae\.model"):
        parse_config(minimal(train_vqvae={"model": {"codebook_size_top": 1}}))


def test_prior_fields_derived_from_the_codes_are_refused():
    with pytest.raises(
        ConfigError, match=r"train_prior\.top\.model\.num_codes is set by the pipeline"
    ):
        parse_config(minimal(train_prior={"top": {"model": {"num_codes": 512}}}))


def test_overrides_parse_yaml_values_and_create_sections():
    cfg = parse_config(
        minimal(),
        [
            "train_vqvae.steps=7",
            "data.image_size=[16, 32]",
            "sample.classes=[circle]",
            "tokenize.num_actors=2",
        ],
    )
    assert cfg.train_vqvae.steps == 7
    assert cfg.data.size_hw == (16, 32)
    assert cfg.sample.classes == ["circle"]
    assert cfg.tokenize.num_actors == 2


@pytest.mark.parametrize("bad", ["train_vqvae.steps", "=3", "data..source=x"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="override"):
        parse_config(minimal(), [bad])


def test_override_of_unknown_key_is_an_error():
    with pytest.raises(ConfigError, match=r"train_vqvae\.nope: unknown key"):
        parse_config(minimal(), ["train_vqvae.nope=1"])


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text(yaml.safe_dump("just a string"))
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(scalar)
