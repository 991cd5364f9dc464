"""The canonical in-memory adapter: module key -> an AdapterModule (lora/adapter.py; LoRA's is LoraModule with
down, up, alpha), independent of any file format. Every format converter maps to and from this.

Keys are "<component>.<module path>" with component one of the pipeline's parts ("unet", "text_encoder",
"text_encoder_2", "transformer"), e.g. "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q".
"""

from __future__ import annotations

from torch import nn

from quantune.errors import QuantuneError
from quantune.lora.adapter import AdapterLayer, AdapterModule
from quantune.lora.bases import base_type, weight_shape
from quantune.lora.inject import lora_layers
from quantune.modules import set_module

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")


LoraWeights = dict[str, AdapterModule]


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
        base = components[component].get_submodule(real) if real else None
        if isinstance(base, AdapterLayer) or base_type(base) is not None:  # a conv's kernel, for LoHa / LoKr
            mod = mod.for_shape(weight_shape(base))
        out[f"{component}.{real}" if real else key] = mod
    return out


def get_lora_weights(pipe_or_model) -> LoraWeights:
    """Collect the adapter layers of a pipeline or model into canonical weights (detached copies)."""
    return {
        f"{component}.{name}": layer.to_module()
        for component, model in components_of(pipe_or_model).items()
        for name, layer in lora_layers(model).items()
    }


def apply_lora(pipe_or_model, weights: LoraWeights, multiplier: float = 1.0) -> list[str]:
    """Wrap the modules named in `weights` with adapter layers holding those weights (in place, not merged); all
    modules are checked before any is wrapped. Float and integer bases both carry them (lora/bases.py)."""
    components = components_of(pipe_or_model)
    plan = []
    for key, mod in weights.items():
        component, path = split_key(key)
        if component not in components:
            raise QuantuneError(f"the LoRA has weights for {component!r}, which this model does not have")
        model = components[component]
        real = resolve_path(model, path)
        base = model.get_submodule(real) if real else None
        if isinstance(base, AdapterLayer):
            raise QuantuneError(f"{key} already has a LoRA: remove it first, or mix the LoRAs into one")
        if base is None:
            missing = [k for k in weights if not _exists(components, k)]
            raise QuantuneError(
                f"{len(missing) or 1} LoRA module(s) not found in the model (e.g. {key}): this LoRA was made for "
                "another model or architecture"
            )
        if base_type(base) is None:
            raise QuantuneError(
                f"{key} is a {type(base).__name__} in this model, which an adapter cannot wrap (Linear and Conv2d, "
                "float or integer, can): this LoRA was made for another architecture"
            )
        mod = mod.for_shape(weight_shape(base))
        check_shapes(key, mod, base)
        plan.append((model, real, base, mod))
    for model, path, base, mod in plan:
        set_module(model, path, mod.layer(base, multiplier))
    return list(weights)


def _exists(components: dict[str, nn.Module], key: str) -> bool:
    component, path = split_key(key)
    return component in components and resolve_path(components[component], path) is not None


def check_shapes(key: str, mod: AdapterModule, base: nn.Module) -> None:
    problem = mod.problem_with(weight_shape(base))
    if problem:
        raise QuantuneError(f"LoRA shapes for {key} ({problem}): this LoRA was made for another model")
