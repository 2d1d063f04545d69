"""The one table of model kinds: kind name -> model class -> config class.

A kind is what a user writes in a config (``kind: vqvae2``); its model class is what a checkpoint
names (``"model": "VQVAE2"``); its config class is the dataclass that the class is built from.
Some config fields are not the user's to choose: they follow from the data (an autoencoder's
input channels) or from the codes (a prior's codebook size, map shape, classes and condition).
Those *derived* fields are listed here, beside the builder that fills them in, so the config
validation and the training stages read one declaration.

Model classes are imported lazily, by dotted path, so that this table can be read without
importing torch or every model.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import nn

Role = Literal["autoencoder", "prior"]

# Set from the data: the image channels.
AUTOENCODER_DERIVED = frozenset({"in_channels"})
# Set from the codes: what is modelled (codebook size, map shape, classes) and, for a conditional
# prior, the code map it is conditioned on.
PRIOR_DERIVED = frozenset({"num_codes", "height", "width", "num_classes"})
CONDITION_DERIVED = frozenset({"condition_num_codes", "condition_height", "condition_width"})

# How a prior draws its codes (``vq_core.sampling``): "cached" computes each step from what the
# steps before left behind, "naive" runs the whole map every step; both draw the same codes.
SAMPLING_METHODS = ("cached", "naive")
DEFAULT_SAMPLING_METHOD = "cached"  # the same codes as "naive", in far fewer operations


@dataclass(frozen=True)
class ModelKind:
    """One model kind: its name in configs, its role, and where its class lives.

    An autoencoder kind's ``levels`` are those of its default config. A vqvae2 whose config sets
    ``levels`` encodes the levels it names instead: ``levels_for(params)`` reads them from a
    user's model fields without building the model; a built model reports them as its ``levels``
    attribute, a checkpoint in its config.
    """

    name: str
    role: Role
    target: str  # "module:Class"
    # An autoencoder's code maps with its default config, coarsest first; its model class declares
    # the same tuple. Each level gets one prior, conditioned on the level before it (see
    # ``prior_conditions``).
    levels: tuple[str, ...] = ()

    @property
    def class_name(self) -> str:
        """The name a checkpoint stores for this kind's model class."""
        return self.target.split(":")[1]

    @property
    def model_class(self) -> type[nn.Module]:
        module_name, class_name = self.target.split(":")
        return getattr(importlib.import_module(module_name), class_name)

    @property
    def config_class(self) -> type:
        return self.model_class.config_class

    @property
    def derived(self) -> frozenset[str]:
        """Config fields the pipeline sets, which a user's ``model:`` section may not."""
        if self.role == "autoencoder":
            return AUTOENCODER_DERIVED
        return PRIOR_DERIVED | CONDITION_DERIVED

    def levels_for(self, params: dict[str, Any]) -> tuple[str, ...]:
        """The code levels, coarsest first, of this autoencoder kind built from a user's model
        fields (``train_vqvae.model``): those its config's ``level_specs()`` lists when the config
        class has one (a vqvae2's ``levels``), else the kind's own. Builds the config, not the
        model; a bad field raises the config's ValueError."""
        if self.role != "autoencoder":
            raise ValueError(f"model kind {self.name!r} is a {self.role}; it has no code levels")
        specs = getattr(self.config_class(**params), "level_specs", None)
        return tuple(spec.name for spec in specs()) if specs is not None else self.levels

    def fields(self) -> set[str]:
        return {f.name for f in dataclasses.fields(self.config_class)}

    def check_user_fields(self, params: dict[str, Any], where: str) -> None:
        """Reject keys of a user's ``model:`` section that are derived or not config fields."""
        names = self.fields()
        for key in params:
            if key in self.derived:
                raise ValueError(
                    f"{where}.{key} is set by the pipeline (from the data or the codes); remove it"
                )
            if key not in names:
                allowed = ", ".join(sorted(names - self.derived))
                raise ValueError(
                    f"{where}.{key} is not a {self.config_class.__name__} field; "
                    f"expected one of: {allowed}"
                )

    def config(self, params: dict[str, Any], derived: dict[str, Any]):
        """The config dataclass from a user's fields and the derived ones."""
        missing = sorted(set(derived) - self.fields())
        if missing:
            raise ValueError(
                f"model kind {self.name!r} cannot be used here: its config "
                f"{self.config_class.__name__} lacks {missing}"
            )
        return self.config_class(**{**params, **derived})

    def build(self, params: dict[str, Any], derived: dict[str, Any]) -> nn.Module:
        """A freshly initialised model from a user's fields and the derived ones."""
        return self.model_class(self.config(params, derived))


KINDS: dict[str, ModelKind] = {
    kind.name: kind
    for kind in (
        ModelKind("vqvae2", "autoencoder", "vq_core.vqvae:VQVAE2", ("top", "bottom")),
        ModelKind("vqvae", "autoencoder", "vq_core.vqvae:VQVAE", ("codes",)),
        ModelKind("dvae", "autoencoder", "vq_core.dvae:DiscreteVAE", ("codes",)),
        ModelKind("pixelsnail", "prior", "vq_core.pixelsnail:PixelSNAIL"),
        ModelKind("pixelcnn", "prior", "vq_core.pixelcnn:GatedPixelCNN"),
        ModelKind("transformer", "prior", "vq_core.transformer:TransformerPrior"),
    )
}


def kinds_of(role: Role) -> tuple[str, ...]:
    """The kind names of one role, in table order."""
    return tuple(name for name, kind in KINDS.items() if kind.role == role)


def prior_conditions(levels: tuple[str, ...] | list[str]) -> dict[str, str | None]:
    """Each level's prior and the level it is conditioned on, coarsest first.

    The coarsest level's prior sees only the class; every finer level's prior also reads the level
    just before it (VQ-VAE-2: p(top | class), then p(bottom | top, class); with three levels
    p(top | class), p(middle | top, class), p(bottom | middle, class)).
    """
    levels = list(levels)
    if not levels or len(set(levels)) != len(levels):
        raise ValueError(f"expected distinct code level names, got {levels}")
    return {level: (levels[i - 1] if i else None) for i, level in enumerate(levels)}


def get_kind(name: str) -> ModelKind:
    if name not in KINDS:
        raise ValueError(f"unknown model kind {name!r}; known kinds: {', '.join(KINDS)}")
    return KINDS[name]


def kind_of_class(class_name: str) -> ModelKind:
    """The kind whose model class a checkpoint names (``"VQVAE2"`` -> vqvae2)."""
    for kind in KINDS.values():
        if kind.class_name == class_name:
            return kind
    known = ", ".join(sorted(k.class_name for k in KINDS.values()))
    raise ValueError(f"unknown model {class_name!r}; known models: {known}")


def autoencoder_fields(in_channels: int) -> dict[str, Any]:
    """The derived fields of an autoencoder for images with ``in_channels`` channels."""
    return {"in_channels": int(in_channels)}


def prior_fields(
    num_codes: int,
    shape: tuple[int, int] | list[int],
    num_classes: int,
    condition: tuple[int, tuple[int, int] | list[int]] | None = None,
) -> dict[str, Any]:
    """The derived fields of a prior over an h x w map of ``num_codes`` codes.

    ``condition`` is (codebook size, map shape) of the code map the prior is conditioned on (the
    top map, for a bottom prior). A single class carries no information, so ``num_classes`` below
    2 makes the prior unconditional on the class.
    """
    fields = {
        "num_codes": int(num_codes),
        "height": int(shape[0]),
        "width": int(shape[1]),
        "num_classes": int(num_classes) if num_classes > 1 else 0,
    }
    if condition is not None:
        condition_codes, (height, width) = condition
        fields |= {
            "condition_num_codes": int(condition_codes),
            "condition_height": int(height),
            "condition_width": int(width),
        }
    return fields
