"""The adapter contract, separate from the base layers it wraps (lora/bases.py) and from any file format.

Two halves per adapter type (LoRA in lora/layers.py; LoHa, LoKr, DoRA are each one more file):
- `AdapterModule`: the canonical in-memory weights of one adapted module. Every tool reads it through the same
  interface: `delta()` (the weight update, in the base weight's shape where the factors give it; `delta_for(W)` for a
  given base weight W, which a DoRA's update depends on), `rank` / `alpha`, `problem_with(shape)`
  (does it fit a base), the tensors under kohya / LyCORIS suffixes (`kohya_tensors`, `from_kohya`: what the
  quantune and kohya formats store) and under peft's names (`peft_tensors`), and `layer(base)`, the module that
  applies it. Merge, mix (by deltas), inspect and the formats never reach into one type's factors.
- `AdapterLayer`: an nn.Module wrapping a frozen base, y = base(x) + multiplier * adapter(x), with merge / unmerge
  of a float base in place (an integer base is merged by `merge_into`, which quantizes the new weight again).
  DoRA (lora/dora.py) is not a layer of its own: it decomposes any adapter layer's weight, held as the layer's
  `decomposition` (None for a plain adapter), so LoRA, LoHa and LoKr each get their DoRA form.
`ADAPTERS` maps a type name to its module class; `register_adapter` adds one. A type's `new_layer` builds a fresh,
trainable layer from a LoraConfig (`lora/inject.py`'s `add_lora` asks the type named by `LoraConfig.type`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from quantune.errors import QuantuneError
from quantune.lora.bases import base_type, weight_shape, with_delta


class AdapterModule:
    """Canonical weights of one adapted module (see the module docstring); subclasses are dataclasses."""

    kind: ClassVar[str] = ""
    kohya_suffixes: ClassVar[tuple[str, ...]] = ()  # the first one identifies the type in a file
    wraps: ClassVar[bool] = False  # True: the type adds tensors to another type's (DoRA's dora_scale)

    @property
    def rank(self) -> int:
        raise NotImplementedError

    alpha: float

    @classmethod
    def identifies(cls, tensors: dict[str, torch.Tensor]) -> bool:
        """Whether a file's tensors of one module ("<suffix>": tensor) are this type's."""
        return cls.kohya_suffixes[0] in tensors

    def delta(self) -> torch.Tensor:
        raise NotImplementedError

    def delta_for(self, weight: torch.Tensor) -> torch.Tensor:
        """The update for a base of weight `weight` (float32, in its shape): W' - W."""
        return self.delta().reshape(weight.shape)

    def for_shape(self, shape: tuple[int, ...]) -> AdapterModule:
        """The same weights told the base weight's shape (a file's factors may not give a conv's kernel)."""
        return self

    @property
    def factors(self) -> dict[str, tuple[int, ...]]:
        """The stored factors' shapes by name (for `lora inspect`)."""
        return {name: tuple(t.shape) for name, t in self.kohya_tensors().items() if name != "alpha"}

    @classmethod
    def new_layer(cls, base: nn.Module, rank: int, alpha: float, config, generator=None) -> AdapterLayer:
        """A trainable layer of this type on `base`, initialised so the model starts unchanged (`config`: the
        LoraConfig with the type's options)."""
        raise QuantuneError(f"quantune cannot train {cls.kind} adapters")

    def problem_with(self, shape: tuple[int, ...]) -> str | None:
        """Why these weights cannot adapt a base weight of `shape`, or None when they fit."""
        raise NotImplementedError

    def check(self, key: str) -> None:
        """The file's own consistency (factor ranks agree, alpha finite and > 0): one error line naming `key`."""
        raise NotImplementedError

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def from_kohya(cls, tensors: dict[str, torch.Tensor], key: str) -> AdapterModule:
        raise NotImplementedError

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        raise QuantuneError(f"a {self.kind} adapter has no peft / diffusers form: write the quantune or kohya format")

    def with_alpha(self, alpha: float) -> AdapterModule:
        """The same update stored with another alpha (kohya files keep one alpha per component)."""
        raise NotImplementedError

    def layer(self, base: nn.Module, multiplier: float = 1.0) -> AdapterLayer:
        raise NotImplementedError

    def tensors(self) -> list[torch.Tensor]:
        return [t for name, t in self.kohya_tensors().items() if name != "alpha"]


ADAPTERS: dict[str, type[AdapterModule]] = {}


def register_adapter(cls: type[AdapterModule]) -> type[AdapterModule]:
    ADAPTERS[cls.kind] = cls
    return cls


def kohya_suffixes() -> list[str]:
    """Every registered type's tensor suffixes, longest first (for splitting "<module>.<suffix>" keys)."""
    return sorted({s for cls in ADAPTERS.values() for s in cls.kohya_suffixes}, key=len, reverse=True)


def group_by_module(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Split "<module>.<suffix>" keys into {module: {suffix: tensor}}; keys with no known suffix are ignored."""
    suffixes = kohya_suffixes()
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in sd.items():
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        if suffix is not None:
            out.setdefault(key[: -len(suffix) - 1], {})[suffix] = tensor
    return out


def module_from_kohya(tensors: dict[str, torch.Tensor], key: str) -> AdapterModule:
    """The adapter type whose identifying suffix is present builds the module (a wrapping type such as DoRA, whose
    suffix sits beside another type's, first); an unknown layout is one line."""
    kinds = [cls for cls in ADAPTERS.values() if not cls.wraps and cls.identifies(tensors)]
    if len(kinds) > 1:
        names = ", ".join(cls.kind for cls in kinds)
        raise QuantuneError(f"{key} holds the tensors of several adapter types ({names}): the file is broken")
    for cls in sorted(ADAPTERS.values(), key=lambda c: not c.wraps):
        if cls.identifies(tensors):
            return cls.from_kohya(tensors, key)
    found = ", ".join(sorted(tensors))
    raise QuantuneError(f"{key}: tensors {found} are no adapter type quantune reads ({', '.join(ADAPTERS)})")


class AdapterLayer(nn.Module):
    """A frozen base (any lora/bases.py type) plus an adapter: y = base(x) + multiplier * adapter(x)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        kind = base_type(base_layer)
        if kind is None:
            raise QuantuneError(
                f"an adapter wraps nn.Linear and nn.Conv2d layers (float or integer), not "
                f"{type(base_layer).__name__}: change the targets"
            )
        self.base_layer = base_layer
        self.base_kind = kind.kind
        self.multiplier = 1.0
        self.merged_multiplier: float | None = None  # the multiplier folded into the base weight, if merged
        self.decomposition: nn.Module | None = None  # DoRA's magnitude and its forward (lora/dora.py), if any
        self.merged_update: torch.Tensor | None = None  # a decomposed layer's merged W' - W (to unmerge it)

    @property
    def quantized_base(self) -> bool:
        """True while the base is an integer layer (QLoRA quantizes a base after its adapter was added)."""
        kind = base_type(self.base_layer)
        return kind is not None and kind.stored

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return weight_shape(self.base_layer)

    @property
    def merged(self) -> bool:
        return self.merged_multiplier is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged or self.multiplier == 0.0:
            return y
        if self.decomposition is not None:
            return self.decomposition.apply(self, x, y)
        return y + self.adapter_forward(x, self.multiplier)

    def adapter_forward(self, x: torch.Tensor, multiplier: float) -> torch.Tensor:
        raise NotImplementedError

    def get_delta_weight(self) -> torch.Tensor:
        """The adapter's own update dW, in the base weight's shape (float32 on an integer base)."""
        raise NotImplementedError

    def base_weight(self) -> torch.Tensor:
        """The base's weight W as a float tensor (an integer base dequantized), detached."""
        return base_type(self.base_layer).weight(self.base_layer).detach()

    def weight_update(self) -> torch.Tensor:
        """W' - W at multiplier 1: dW, or DoRA's m (W + dW) / ||W + dW|| - W when the weight is decomposed."""
        if self.decomposition is not None:
            return self.decomposition.update(self)
        return self.get_delta_weight()

    def to_module(self) -> AdapterModule:
        """The canonical weights of this layer (detached copies); a decomposed layer's as lora/dora.py's module."""
        module = self.adapter_module()
        return self.decomposition.wrap(module) if self.decomposition is not None else module

    def adapter_module(self) -> AdapterModule:
        """The canonical weights of the adapter itself (without a decomposition)."""
        raise NotImplementedError

    def merge(self, safe: bool = True) -> None:
        """Fold multiplier * delta into a float base in place; safe=True refuses NaN / inf. An integer base is not
        merged in place: `merge_into` (lora merge) re-quantizes, `quantune qlora merge` does it for a training run."""
        if self.merged:
            return
        if self.quantized_base:
            raise QuantuneError(
                "a LoRA on a quantized base cannot be merged in place: `quantune qlora merge RUN_DIR --out DIR` "
                "dequantizes, adds and re-quantizes a training run; `quantune lora merge` does it for a LoRA file"
            )
        delta = self.weight_update() * self.multiplier
        if safe and not torch.isfinite(delta).all():
            raise QuantuneError("the LoRA delta has NaN or inf values: refusing to merge (the adapter is broken)")
        self.base_layer = with_delta(self.base_layer, delta)
        self.merged_multiplier = self.multiplier
        if self.decomposition is not None:
            self.merged_update = delta  # recomputing it after the merge would read the merged weight

    def unmerge(self) -> None:
        if not self.merged:
            return
        if self.decomposition is not None:  # DoRA's update depends on the base weight: the one merged into it
            self.base_layer = with_delta(self.base_layer, -self.merged_update)
        else:
            self.base_layer = with_delta(self.base_layer, -self.get_delta_weight() * self.merged_multiplier)
        self.merged_update = None
        self.merged_multiplier = None
