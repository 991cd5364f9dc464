"""Model families: one module each (families/sd.py, families/sdxl.py, ...), registered here in the order they
are tried. `family_of(pipe)` is how every job learns what it is working on."""

from __future__ import annotations

from quantune.errors import QuantuneError
from quantune.families.base import Conditioning, Family, using_modules
from quantune.families.flux import Flux
from quantune.families.pixart import PixArtSigma
from quantune.families.sd import StableDiffusion
from quantune.families.sd3 import StableDiffusion3
from quantune.families.sdxl import StableDiffusionXL

FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family (its instance); the first family whose `matches` accepts a pipeline is its family."""
    if family.name in FAMILIES:
        raise ValueError(f"family {family.name!r} is registered twice")
    FAMILIES[family.name] = family
    return family


register(StableDiffusionXL())  # before SD: both have a UNet2DConditionModel, SDXL's has added conditions
register(StableDiffusion())
register(PixArtSigma())
register(StableDiffusion3())
register(Flux())


def family_of(pipe) -> Family:
    """The family of a pipeline; an unknown one is one error line listing the supported families."""
    for family in FAMILIES.values():
        if family.matches(pipe):
            return family
    names = ", ".join(f"{f.name} ({', '.join(f.pipeline_classes[:1])})" for f in FAMILIES.values())
    raise QuantuneError(f"{type(pipe).__name__} is not a model family quantune supports: it supports {names}")


def family_of_model(model) -> Family:
    """The family of a bare denoiser (e.g. `quantize_model(model, ...)`), by its class; refused by name."""
    name = type(model).__name__
    for family in FAMILIES.values():
        if name in family.denoiser_classes or name in family.model_classes:
            return family
    raise QuantuneError(f"{name} is not a denoiser of a model family quantune supports")


def zoo() -> dict:
    """Every built-in model, `zoo:NAME` -> builder, from the families' own lists."""
    return {name: build for family in FAMILIES.values() for name, build in family.zoo.items()}


__all__ = ["Conditioning", "Family", "FAMILIES", "family_of", "family_of_model", "register", "using_modules", "zoo"]
