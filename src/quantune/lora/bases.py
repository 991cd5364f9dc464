"""The frozen layers an adapter can wrap, behind one small dispatcher, so adapters never name a base type.

A base is "linear" or "conv2d" and is either float (nn.Linear / nn.Conv2d: its weight is read and changed in
place) or stored (any module with `weight_shape`, `dequantize()` and `with_weight(w)`, as quantune's integer
layers have; a merge into it quantizes the new weight again, QLoRA + PTQ). `BASES` is the list a new kind of base
(another library's quantized Linear, say) is added to: one `BaseType` entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


def _is_stored(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("weight_shape", "dequantize", "with_weight"))


@dataclass(frozen=True)
class BaseType:
    """One kind of base layer: how to recognise it, read its weight and give a module holding weight + delta."""

    name: str
    kind: str  # "linear" or "conv2d": the adapter's shape follows it
    matches: Callable[[nn.Module], bool]
    weight: Callable[[nn.Module], torch.Tensor]
    stored: bool  # True: the weight is not a float parameter (integer codes); merging re-quantizes


BASES: list[BaseType] = [
    BaseType("Linear", "linear", lambda m: isinstance(m, nn.Linear), lambda m: m.weight, stored=False),
    BaseType("Conv2d", "conv2d", lambda m: isinstance(m, nn.Conv2d), lambda m: m.weight, stored=False),
    BaseType(
        "stored Linear",
        "linear",
        lambda m: _is_stored(m) and hasattr(m, "in_features"),
        lambda m: m.dequantize(),
        stored=True,
    ),  # fmt: skip
    BaseType(
        "stored Conv2d",
        "conv2d",
        lambda m: _is_stored(m) and hasattr(m, "in_channels"),
        lambda m: m.dequantize(),
        stored=True,
    ),  # fmt: skip
]


def base_type(module: nn.Module) -> BaseType | None:
    """The entry of BASES that `module` is, or None (it cannot carry an adapter)."""
    return next((b for b in BASES if b.matches(module)), None)


def weight_shape(module: nn.Module) -> tuple[int, ...]:
    shape = getattr(module, "weight_shape", None)
    return tuple(shape) if shape is not None else tuple(module.weight.shape)


def reference_tensor(module: nn.Module) -> torch.Tensor:
    """A float tensor of the base whose device and dtype an adapter's factors should take."""
    return module.scale if _is_stored(module) else module.weight


def with_delta(module: nn.Module, delta: torch.Tensor) -> nn.Module:
    """A base holding W + delta: a float base is changed in place and returned; a stored base gives a new module
    (its weight quantized again at its own bits)."""
    kind = base_type(module)
    if kind is not None and kind.stored:
        return module.with_weight(kind.weight(module).float() + delta.float())
    with torch.no_grad():
        module.weight.add_(delta.to(module.weight))
    return module
