"""Adapters whose update is a weight built from factors (LyCORIS's LoHa and LoKr: lora/loha.py, lora/lokr.py).

Such an update has no cheap two-matmul path like LoRA's B (A x): the layer forms dW from its factors and applies
it with the base's own op, y = base(x) + multiplier * op(x, dW), op = F.linear or F.conv2d with the base conv's
stride / padding / dilation (LyCORIS's "bypass" forward; its default forward rebuilds W + dW instead, equal up to
rounding). The factors are kept under their file names (kohya / LyCORIS suffixes, which peft uses too), so a
`FactoredModule` is its factors plus alpha, and a type file gives only its math: which factors exist, `build`
(factors, scale -> dW) and the initialisation LyCORIS uses. Written here because neither LyCORIS's nor peft's
modules wrap quantune's integer bases or read quantune's canonical weights.

A conv's dW from non-Tucker factors is flat, [out, in * kh * kw] (the files do not record the kernel); `shape`
holds the base weight's shape once known (`for_shape`, given by apply / merge / canonicalize).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantune.errors import QuantuneError
from quantune.lora.adapter import AdapterLayer, AdapterModule
from quantune.lora.bases import reference_tensor


@dataclass
class FactoredModule(AdapterModule):
    """Factors by suffix (e.g. LoHa's "hada_w1_a") and alpha; dW = build(factors, alpha / rank)."""

    parts: dict[str, torch.Tensor]
    alpha: float
    shape: tuple[int, ...] | None = None  # the base weight's shape, when known

    # -- a type's math ----------------------------------------------------------------------------------------
    @staticmethod
    def build(parts: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def layout_problem(cls, parts: dict[str, torch.Tensor]) -> str | None:
        """What is missing or contradictory in these factors, or None."""
        raise NotImplementedError

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    # -- the contract ------------------------------------------------------------------------------------------
    def delta(self) -> torch.Tensor:
        dw = self.build({k: t.float() for k, t in self.parts.items()}, self.scale)
        return dw.reshape(self.shape) if self.shape is not None else dw

    def for_shape(self, shape: tuple[int, ...]) -> FactoredModule:
        if self.problem_with(shape) is not None:
            return self
        return type(self)(self.parts, self.alpha, tuple(shape))

    def update_shape(self) -> tuple[int, ...]:
        """dW's shape without forming it (a flat conv's [out, in * kh * kw] when the kernel is unknown)."""
        return self.shape if self.shape is not None else tuple(self.build(meta_parts(self.parts), 1.0).shape)

    def problem_with(self, shape: tuple[int, ...]) -> str | None:
        mine, shape = tuple(self.update_shape()), tuple(shape)
        if mine == shape or (len(mine) == 2 and len(shape) == 4 and mine == (shape[0], math.prod(shape[1:]))):
            return None
        factors = ", ".join(f"{k} {list(t.shape)}" for k, t in self.parts.items())
        return f"{self.kind} factors {factors} give an update of shape {list(mine)}, not the layer's {list(shape)}"

    def check(self, key: str) -> None:
        problem = self.layout_problem(self.parts)
        if problem:
            raise QuantuneError(f"{key}: {problem}: the file is broken")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise QuantuneError(f"{key}: alpha = {self.alpha} must be a finite number > 0: the file is broken")

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        return {**self.parts, "alpha": torch.tensor(self.alpha, dtype=torch.float32)}

    @classmethod
    def from_kohya(cls, tensors: dict[str, torch.Tensor], key: str) -> FactoredModule:
        parts = {k: t for k, t in tensors.items() if k in cls.kohya_suffixes and k != "alpha"}
        problem = cls.layout_problem(parts)
        if problem:
            raise QuantuneError(f"{key}: {problem}: the file is incomplete or broken")
        rank = cls.rank_of(parts)
        alpha = float(tensors["alpha"]) if "alpha" in tensors else float(rank)  # no alpha: scale 1
        return cls(parts, alpha)

    @classmethod
    def rank_of(cls, parts: dict[str, torch.Tensor]) -> int:
        raise NotImplementedError

    @property
    def rank(self) -> int:
        return self.rank_of(self.parts)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.parts)  # peft's LoHa / LoKr layers use LyCORIS's names and layouts

    def with_alpha(self, alpha: float) -> FactoredModule:
        """alpha' with the first factor times alpha / alpha': the update is unchanged (bit-exact when equal)."""
        if alpha == self.alpha:
            return self
        first = next(k for k in self.kohya_suffixes if k in self.parts)
        parts = dict(self.parts)
        parts[first] = (parts[first].float() * (self.scale / (alpha / self.rank))).to(parts[first].dtype)
        return type(self)(parts, alpha, self.shape)

    def layer(self, base: nn.Module, multiplier: float = 1.0) -> FactoredLayer:
        layer = FactoredLayer(base, self.for_shape(tuple(base_shape(base))))
        layer.multiplier = multiplier
        return layer.requires_grad_(False)


def meta_parts(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(t.shape, device="meta") for k, t in parts.items()}


def base_shape(base: nn.Module) -> tuple[int, ...]:
    shape = getattr(base, "weight_shape", None)
    return tuple(shape) if shape is not None else tuple(base.weight.shape)


def base_op(base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The base's own op with another weight and no bias: F.linear, or F.conv2d with its stride / padding."""
    if len(weight.shape) == 2:
        return F.linear(x, weight)
    if base.padding_mode != "zeros":
        raise QuantuneError(f"an adapter on a conv with padding_mode={base.padding_mode!r} is not supported")
    return F.conv2d(x, weight, None, base.stride, base.padding, base.dilation, base.groups)


class FactoredLayer(AdapterLayer):
    """A frozen base plus a factored update (the factors are this layer's parameters, named as in the files)."""

    def __init__(self, base_layer: nn.Module, module: FactoredModule) -> None:
        super().__init__(base_layer)
        if getattr(base_layer, "groups", 1) != 1:
            raise QuantuneError(f"a {module.kind} adapter on a grouped conv (groups={base_layer.groups}) is not "
                                "supported: exclude it")  # fmt: skip
        self.module_type = type(module)
        self.alpha = float(module.alpha)
        self.shape = base_shape(base_layer)
        w = reference_tensor(base_layer)
        self.factors = nn.ParameterDict(
            {k: nn.Parameter(t.detach().to(device=w.device, dtype=w.dtype).clone()) for k, t in module.parts.items()}
        )
        self.scaling = module.scale
        self.r = module.rank

    def get_delta_weight(self) -> torch.Tensor:
        dw = self.module_type.build(dict(self.factors), self.scaling).reshape(self.shape)
        return dw.float() if self.quantized_base else dw

    def adapter_forward(self, x: torch.Tensor, multiplier: float) -> torch.Tensor:
        return base_op(self.base_layer, x, (self.get_delta_weight() * multiplier).to(x.dtype))

    def adapter_module(self) -> FactoredModule:
        parts = {k: p.detach().clone() for k, p in self.factors.items()}
        return self.module_type(parts, self.alpha, self.shape)

    def extra_repr(self) -> str:
        return f"{self.module_type.kind}, r={self.r}, scale={self.scaling:.4g}"


def normal_(shape, std: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(shape, generator=generator) * std


def kaiming_(shape, generator: torch.Generator | None) -> torch.Tensor:
    """nn.Linear's default init (kaiming-uniform, a = sqrt(5)): bound 1 / sqrt(fan_in), fan_in = shape[1:]."""
    bound = 1.0 / math.sqrt(math.prod(shape[1:]))
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound
