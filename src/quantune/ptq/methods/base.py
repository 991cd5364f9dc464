"""The PTQ-method seam: a method is a PTQMethod subclass, registered by name, with its own options and four parts
that the generic driver (ptq/driver.py: quantize_model) calls in this order:
1. calibration-sample selection: `calibration_counts(features, total)`, how many calibration samples each sampler
   step gets (uniform by default; EDA-DM's TDAC, arXiv 2401.04585 section 4.1);
2. layer wrapping: `wrap(model, splits)`, the fake-quantized model (ptq/wrap.py by default);
3. unit reconstruction: `reconstruct(unit, fp_in, q_in, generator)` for each unit in forward order, when
   `learns(cfg)` (BRECQ / Q-Diffusion / EDA-DM's FBR through ptq/reconstruct.py: `Reconstructing`);
4. export: `export(model)`, the integer model (ptq/wrap.py: export_integer by default).
`Options` is the method's own dataclass of hyperparameters, built from PTQConfig's fields of the same name and its
`extra_options` (validated in the dataclass's __post_init__). A new method is one file under ptq/methods/ with a
`@register_method` class, imported in ptq/methods/__init__.py. See docs/quantization.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from quantune.errors import QuantuneError
from quantune.ptq.reconstruct import ReconRecipe, reconstruct_unit
from quantune.ptq.tdac import uniform_counts
from quantune.ptq.wrap import PTQLayer, export_integer, wrap_for_ptq

METHODS: dict[str, type[PTQMethod]] = {}  # name -> class, in registration order (the CLI's listing)


@dataclass(frozen=True)
class NoOptions:
    """A method without options of its own."""


class PTQMethod:
    """One post-training quantization method (module docstring); instantiated per run with its PTQConfig."""

    name: ClassVar[str] = ""
    search: ClassVar[str] = "l2.4"  # range search of weights and activations: "l2.4" or "minmax"
    split_weight: ClassVar[bool] = False  # the shortcut split of the weight grid too, not only of the input
    Options: ClassVar[type] = NoOptions

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.options = cfg.options

    @classmethod
    def build_options(cls, cfg) -> object:
        """The method's Options from `cfg`: fields of the same name, then `cfg.extra_options`."""
        names = [f.name for f in dataclasses.fields(cls.Options)]
        unknown = sorted(set(cfg.extra_options) - set(names))
        if unknown:
            raise QuantuneError(
                f"method {cls.name!r} has no option {unknown[0]!r}: its options are {', '.join(names) or 'none'}"
            )
        values = {n: getattr(cfg, n) for n in names if hasattr(cfg, n)}
        return cls.Options(**{**values, **cfg.extra_options})

    @classmethod
    def learns(cls, cfg) -> bool:
        """Does the method reconstruct units (learn rounding / step sizes), or only calibrate ranges?"""
        return False

    def calibration_counts(self, features: torch.Tensor, total: int) -> tuple[torch.Tensor, list[int]]:
        """(weight per sampler step, samples per step summing to `total`) from the TDAC features [steps, ...]."""
        steps = features.shape[0]
        return torch.ones(steps), uniform_counts(steps, total)

    def wrap(self, model: nn.Module, splits: dict[str, int], smooth: dict | None = None) -> dict[str, PTQLayer]:
        return wrap_for_ptq(model, self.cfg, splits, smooth, split_weight=self.split_weight)

    def reconstruct(self, unit: nn.Module, fp_in, q_in, generator: torch.Generator) -> float:
        raise NotImplementedError(f"{self.name} does not reconstruct")

    def export(self, model: nn.Module) -> int:
        return export_integer(model)


class Reconstructing(PTQMethod):
    """A method that reconstructs every unit with ptq/reconstruct.py, as its `recipe()` says."""

    @classmethod
    def learns(cls, cfg) -> bool:
        return cfg.iters > 0

    def recipe(self) -> ReconRecipe:
        raise NotImplementedError

    def reconstruct(self, unit: nn.Module, fp_in, q_in, generator: torch.Generator) -> float:
        return reconstruct_unit(unit, fp_in, q_in, self.cfg, generator, self.recipe())


def register_method(cls: type[PTQMethod]) -> type[PTQMethod]:
    """Class decorator: `cls` runs as `PTQConfig(method=cls.name)` / `quantune quantize --method NAME`."""
    if not cls.name:
        raise QuantuneError(f"{cls.__name__} has no name: set the class attribute `name`")
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[PTQMethod]:
    cls = METHODS.get(name)
    if cls is None:
        raise QuantuneError(f"method = {name!r} is not supported: choose one of {', '.join(METHODS)}")
    return cls


def method_for(cfg) -> PTQMethod:
    """The method of `cfg`, ready to run."""
    return method_class(cfg.method)(cfg)
