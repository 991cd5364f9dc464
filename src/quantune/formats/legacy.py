"""Import-only readers for two older LoRA files: cloneofsimo/lora and lora_wrapper. Written by hand (no library
reads them). Their pickles are opened with torch.load(weights_only=True) by the caller (quantune.io.load_pickle).

cloneofsimo/lora (github.com/cloneofsimo/lora): a `.pt` list [up0, down0, up1, down1, ...] or a safetensors file
with keys "unet:{i}:up" / "unet:{i}:down" (also "text_encoder:{i}:...") and the target classes as JSON in the
metadata under the component name. Entries are positional: module i is the i-th nn.Linear (or Conv2d) found by
walking `model.modules()` for ancestors whose class is a target ("CrossAttention"/"Attention", "GEGLU" for the
UNet, "CLIPAttention" for the text encoder) and then each ancestor's `named_modules()`. The file stores up * scale
with scale 1 by default, so the update is B A exactly: alpha = r.

lora_wrapper (github.com/zcc31415926/lora_wrapper): a torch checkpoint of CompVis (LDM) parameter names,
"<module>.lora_A" [r, C_in], "<module>.lora_B" [C_out, r], "<module>.lora_scale" (update = scale * B A); a soft conv
stores "<module>.lora_B.weight" (C_in -> r conv, the down) and "<module>.lora_A.weight" (r -> C_out conv, the up).
CompVis names are mapped to diffusers names with the UNet's layers_per_block (input_blocks / middle_block /
output_blocks -> down_blocks / mid_block / up_blocks) and "cond_stage_model.transformer." -> the CLIP text model.
"""

from __future__ import annotations

import json
import re

import torch
from torch import nn

from quantune.errors import QuantuneError
from quantune.formats.unet_names import ldm_to_diffusers_path
from quantune.lora.layers import LoraModule
from quantune.lora.weights import LoraWeights

CLONEOFSIMO_TARGETS = {"unet": {"CrossAttention", "Attention", "GEGLU"}, "text_encoder": {"CLIPAttention"}}


def cloneofsimo_module_order(model: nn.Module, ancestor_classes: set[str]) -> list[str]:
    """Module names in the order cloneofsimo's `_find_modules` visits them (ancestors, then their Linear/Conv)."""
    names = []
    for anc_name, ancestor in model.named_modules():
        if type(ancestor).__name__ not in ancestor_classes:
            continue
        for child_name, child in ancestor.named_modules():
            full = f"{anc_name}.{child_name}" if child_name else anc_name
            if isinstance(child, (nn.Linear, nn.Conv2d)):  # nested targets repeat modules, as cloneofsimo does
                names.append(full)
    return names


def from_cloneofsimo_list(tensors: list, model: nn.Module, component: str = "unet") -> LoraWeights:
    """The `.pt` positional list [up0, down0, ...] applied in the model's walking order."""
    if len(tensors) % 2 or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise QuantuneError("a cloneofsimo .pt must be a list [up0, down0, up1, down1, ...] of tensors")
    pairs = [(tensors[i], tensors[i + 1]) for i in range(0, len(tensors), 2)]
    return _positional(pairs, model, component, CLONEOFSIMO_TARGETS[component])


def from_cloneofsimo_safetensors(sd: dict, metadata: dict, components: dict[str, nn.Module]) -> LoraWeights:
    weights: LoraWeights = {}
    for component in sorted({k.split(":")[0] for k in sd}):
        if component not in components:
            raise QuantuneError(f"the cloneofsimo file has {component!r} weights but the model has no such part")
        count = len([k for k in sd if re.fullmatch(rf"{component}:\d+:up", k)])
        try:
            pairs = [(sd[f"{component}:{i}:up"], sd[f"{component}:{i}:down"]) for i in range(count)]
        except KeyError as e:
            raise QuantuneError(f"cloneofsimo file lacks {e.args[0]!r}: the file is incomplete") from None
        targets = set(json.loads(metadata[component])) if component in metadata else CLONEOFSIMO_TARGETS[component]
        weights.update(_positional(pairs, components[component], component, targets))
    return weights


def _positional(pairs, model: nn.Module, component: str, targets: set[str]) -> LoraWeights:
    order = cloneofsimo_module_order(model, targets)
    if len(order) != len(pairs):
        raise QuantuneError(
            f"the cloneofsimo LoRA has {len(pairs)} {component} modules but walking the model for {sorted(targets)} "
            f"finds {len(order)}: it was made for another model or other target classes"
        )
    return {
        f"{component}.{name}": LoraModule(down=down, up=up, alpha=float(down.shape[0]))
        for name, (up, down) in zip(order, pairs)
    }


def from_lora_wrapper(sd: dict, layers_per_block: int = 2) -> LoraWeights:
    """A lora_wrapper checkpoint (optionally under "state_dict") into canonical weights with diffusers names."""
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    weights: LoraWeights = {}
    for key in sd:
        for orphan, partner in ((".lora_B", ".lora_A"), (".lora_A.weight", ".lora_B.weight")):
            if key.endswith(orphan) and key[: -len(orphan)] + partner not in sd:
                raise QuantuneError(f"lora_wrapper checkpoint lacks the partner of {key!r}: the file is incomplete")
        if key.endswith(".lora_A") or key.endswith(".lora_B.weight"):
            soft = key.endswith(".lora_B.weight")
            module = key[: -len(".lora_B.weight")] if soft else key[: -len(".lora_A")]
            if soft:
                down, up = sd[f"{module}.lora_B.weight"], sd.get(f"{module}.lora_A.weight")
            else:
                down, up = sd[f"{module}.lora_A"], sd.get(f"{module}.lora_B")
            scale_t = sd.get(f"{module}.lora_scale", torch.tensor(1.0))
            if up is None:
                raise QuantuneError(f"lora_wrapper checkpoint lacks the partner of {key!r}: the file is incomplete")
            weights[_wrapper_key(module, layers_per_block)] = LoraModule(
                down=down, up=up, alpha=float(scale_t) * down.shape[0], soft=soft
            )
    if not weights:
        raise QuantuneError("no lora_A / lora_B keys found: not a lora_wrapper checkpoint")
    return weights


def _wrapper_key(module: str, layers_per_block: int) -> str:
    if module.startswith("cond_stage_model.transformer."):
        path = module[len("cond_stage_model.transformer.") :]
        return f"text_encoder.{path if path.startswith('text_model.') else 'text_model.' + path}"
    return "unet." + ldm_to_diffusers_path(module.removeprefix("model.diffusion_model."), layers_per_block)


def fix_conv_shapes(weights: LoraWeights, components: dict[str, nn.Module]) -> LoraWeights:
    """lora_wrapper stores a 1x1 conv's A and B as matrices: give them the conv's 4-d shapes."""
    for key, mod in weights.items():
        component, _, path = key.partition(".")
        try:
            base = components[component].get_submodule(path)
        except (KeyError, AttributeError):
            continue
        if isinstance(base, nn.Conv2d) and mod.down.dim() == 2:
            mod.down = mod.down.reshape(*mod.down.shape, 1, 1)
            mod.up = mod.up.reshape(*mod.up.shape, 1, 1)
    return weights
