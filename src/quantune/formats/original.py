"""A diffusion transformer's LoRA under its original checkpoint's module names (formats/checkpoint_names), as kohya
and ComfyUI files store it: fused modules through formats/fused.py, one "<key>.lora_down.weight" /
".lora_up.weight" / ".alpha" triple per original module (LoHa, LoKr and DoRA tensors where a name is one diffusers
module: a fused one holds LoRAs only). `key_of` / `name_of` give the file's spelling of a name
(kohya: "lora_unet_" + the name with "_"; ComfyUI: "diffusion_model." + the name).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from quantune.errors import QuantuneError
from quantune.formats.checkpoint_names import Architecture, architecture_of
from quantune.formats.fused import from_original, to_original
from quantune.lora.adapter import AdapterModule, group_by_module, module_from_kohya
from quantune.lora.layers import LoraModule

logger = logging.getLogger(__name__)
ALIASES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}  # peft's names in some files


def architecture(model: nn.Module | None, what: str) -> Architecture:
    if model is None:
        raise QuantuneError(f"a diffusion transformer's {what} names need its model: pass --model of its pipeline")
    arch = architecture_of(model)
    if arch is None:
        raise QuantuneError(f"quantune knows no {what} names of {type(model).__name__}: write diffusers or peft")
    return arch


def to_tensors(
    weights: dict[str, LoraModule], model: nn.Module, key_of: Callable[[str], str], what: str
) -> dict[str, torch.Tensor]:
    """The transformer's LoRAs (diffusers paths, no component prefix) as tensors under the original names."""
    arch = architecture(model, what)
    modules = to_original(weights, arch.table(model), model, f"{what} ({arch.name})")
    dropped = sorted(name for name in modules if name in arch.rank_alpha)
    if dropped:
        logger.warning("%s %s: diffusers' loader ignores %s (kohya tools and ComfyUI read them)", what, arch.name,
                       ", ".join(dropped))  # fmt: skip
    sd: dict[str, torch.Tensor] = {}
    for name, mod in modules.items():
        if name in arch.rank_alpha and isinstance(mod, LoraModule):  # readers ignoring their alpha (diffusers) too
            mod = LoraModule((mod.down.float() * mod.scale).to(mod.down.dtype), mod.up, float(mod.rank))
        sd.update({f"{key_of(name)}.{suffix}": t for suffix, t in mod.kohya_tensors().items()})
    return sd


def modules_of(sd: dict[str, torch.Tensor], name_of: Callable[[str], str], what: str) -> dict[str, AdapterModule]:
    """Adapter tensors "<key>.<suffix>" (kohya / LyCORIS suffixes; lora_A / lora_B as lora_down / lora_up) ->
    {name_of(key): module}; any other tensor is refused by name."""
    renamed = {}
    for key, tensor in sd.items():
        alias = next((s for s in ALIASES if key.endswith("." + s)), None)
        renamed[key[: -len(alias)] + ALIASES[alias] if alias else key] = tensor
    grouped = group_by_module(renamed)
    known = {f"{k}.{s}" for k, parts in grouped.items() for s in parts}
    stray = next((k for k in renamed if k not in known), None)
    if stray is not None:
        raise QuantuneError(f"unsupported {what} tensor {stray!r}: quantune reads LoRA, LoHa, LoKr and DoRA tensors")
    incomplete = next((k for k, t in grouped.items() if set(t) <= {"alpha", "dora_scale"}), None)
    if incomplete is not None:
        raise QuantuneError(f"{incomplete} has no adapter factors beside its alpha: the file is incomplete")
    return {name_of(key): module_from_kohya(tensors, key) for key, tensors in grouped.items()}


def from_tensors(
    sd: dict[str, torch.Tensor], model: nn.Module, name_of: Callable[[str], str], what: str
) -> dict[str, LoraModule]:
    """Tensors under the original names (the file's spelling, suffix included) -> the model's LoRAs."""
    arch = architecture(model, what)
    what = f"{what} {arch.name}"
    return from_original(modules_of(sd, name_of, what), arch.table(model), model, what)
