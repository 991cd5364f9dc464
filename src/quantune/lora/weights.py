"""The canonical in-memory LoRA: module key -> (down, up, alpha), independent of any file format.

Keys are "<component>.<module path>" with component one of the pipeline's parts ("unet", "text_encoder",
"text_encoder_2", "transformer"), e.g. "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q".
down is A ([r, C_in] or [r, C_in, kh, kw]), up is B ([C_out, r] or [C_out, r, 1, 1]; a soft conv's up is
[C_out, r, kh, kw]), and the update is (alpha / r) * B A: alpha is normalised so that this holds for every
source (rsLoRA and trainable scales are converted on the way in). Every format converter maps to and from this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quantune.errors import QuantuneError
from quantune.lora.inject import lora_layers
from quantune.lora.layers import LoraLayer
from quantune.modules import set_module

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")


@dataclass
class LoraModule:
    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    soft: bool = False

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """(alpha / r) * B A, in float32, shaped as the base weight ([out, in] or [out, in, kh, kw])."""
        if self.soft:
            raise QuantuneError("a soft conv LoRA has no weight delta: it cannot be merged, mixed or converted")
        up, down = self.up.float().flatten(1), self.down.float().flatten(1)
        return (up @ down).view(self.up.shape[0], *self.down.shape[1:]) * self.scale


LoraWeights = dict[str, LoraModule]


def components_of(pipe_or_model) -> dict[str, nn.Module]:
    """The adaptable parts of a pipeline (or {"unet": model} for a bare model)."""
    if isinstance(pipe_or_model, nn.Module):
        return {"unet": pipe_or_model}
    found = {c: getattr(pipe_or_model, c, None) for c in COMPONENTS}
    return {c: m for c, m in found.items() if isinstance(m, nn.Module)}


def split_key(key: str) -> tuple[str, str]:
    component, _, path = key.partition(".")
    if component not in COMPONENTS or not path:
        raise QuantuneError(f"LoRA key {key!r} does not start with a component ({', '.join(COMPONENTS)})")
    return component, path


def resolve_path(model: nn.Module, path: str) -> str | None:
    """The module path in `model` that a file's path names, or None (a few attribute lookups, no tree walk).

    CLIP text encoders are named "text_model.encoder..." in files made with transformers 4 (every SD 1.x / SDXL
    LoRA in the wild) and "encoder..." in transformers 5's CLIPTextModel: either spelling finds the module.
    """
    for candidate in (path, path.removeprefix("text_model."), f"text_model.{path}"):
        try:
            model.get_submodule(candidate)
            return candidate
        except AttributeError:
            continue
    return None


def one_spelling(weights: LoraWeights) -> LoraWeights:
    """Without a model: CLIP paths spelt as transformers 5 names them ("encoder...", not "text_model.encoder..."),
    so LoRAs read from files of either spelling name the same module by the same key (resolve_path finds both)."""
    out: LoraWeights = {}
    for key, mod in weights.items():
        component, path = split_key(key)
        name = f"{component}.{path.removeprefix('text_model.')}" if component.startswith("text_encoder") else key
        if name in out:
            raise QuantuneError(f"{key} appears twice in one LoRA (with and without 'text_model.'): a broken file")
        out[name] = mod
    return out


def canonicalize(weights: LoraWeights, pipe_or_model) -> LoraWeights:
    """Rename keys to the model's own module paths where a file spells them otherwise (see resolve_path)."""
    components = components_of(pipe_or_model)
    out: LoraWeights = {}
    for key, mod in weights.items():
        component, path = split_key(key)
        real = resolve_path(components[component], path) if component in components else None
        out[f"{component}.{real}" if real else key] = mod
    return out


def get_lora_weights(pipe_or_model) -> LoraWeights:
    """Collect the LoRA layers of a pipeline or model into canonical weights (detached copies)."""
    weights: LoraWeights = {}
    for component, model in components_of(pipe_or_model).items():
        for name, layer in lora_layers(model).items():
            weights[f"{component}.{name}"] = LoraModule(
                down=layer.lora_down.weight.detach().clone(),
                up=layer.lora_up.weight.detach().clone(),
                alpha=layer.alpha,
                soft=layer.soft,
            )
    return weights


def apply_lora(pipe_or_model, weights: LoraWeights, multiplier: float = 1.0) -> list[str]:
    """Wrap the modules named in `weights` with LoraLayers holding those weights (in place, not merged)."""
    components = components_of(pipe_or_model)
    plan = []
    for key, mod in weights.items():
        component, path = split_key(key)
        if component not in components:
            raise QuantuneError(f"the LoRA has weights for {component!r}, which this model does not have")
        model = components[component]
        real = resolve_path(model, path)
        base = model.get_submodule(real) if real else None
        if isinstance(base, LoraLayer):
            raise QuantuneError(f"{key} already has a LoRA: remove it first, or mix the LoRAs into one")
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            missing = [k for k in weights if not _exists(components, k)]
            raise QuantuneError(
                f"{len(missing) or 1} LoRA module(s) not found in the model (e.g. {key}): this LoRA was made for "
                "another model or architecture"
            )
        check_shapes(key, mod, base)
        plan.append((model, real, base, mod))
    for model, path, base, mod in plan:
        layer = LoraLayer(base, mod.rank, mod.alpha, conv_mode="soft" if mod.soft else "hard")
        with torch.no_grad():
            layer.lora_down.weight.copy_(mod.down)
            layer.lora_up.weight.copy_(mod.up)
        layer.multiplier = multiplier
        layer.requires_grad_(False)
        set_module(model, path, layer)
    return list(weights)


def _exists(components: dict[str, nn.Module], key: str) -> bool:
    component, path = split_key(key)
    return component in components and resolve_path(components[component], path) is not None


def check_shapes(key: str, mod: LoraModule, base: nn.Module) -> None:
    w = base.weight
    out_f, in_f = w.shape[0], w.shape[1]
    r = mod.rank
    ok = mod.down.shape[1] == in_f and mod.up.shape[0] == out_f and mod.up.shape[1] == r
    if isinstance(base, nn.Conv2d):
        ok = ok and mod.down.dim() == 4 and tuple(mod.down.shape[2:]) == tuple(w.shape[2:]) and mod.up.dim() == 4
    else:
        ok = ok and mod.down.dim() == 2 and mod.up.dim() == 2
    if not ok:
        raise QuantuneError(
            f"LoRA shapes for {key} (down {list(mod.down.shape)}, up {list(mod.up.shape)}) do not fit the model's "
            f"layer {list(w.shape)}: this LoRA was made for another model"
        )
