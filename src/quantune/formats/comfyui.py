"""ComfyUI's own LoRA keys: the names of ComfyUI's model state dict, which are the original checkpoints'.

    diffusion_model.<module>.lora_down.weight / .lora_up.weight / .alpha
    text_encoders.<clip_l | clip_g | clip_h | t5xxl>.transformer.<transformers path>.lora_down.weight / ...

<module> is the LDM / Stability name for an SD-1.x / SDXL UNet (input_blocks.4.1.transformer_blocks.0.attn1.to_q;
formats/unet_names.py) and the original transformer's for FLUX.1, SD3 and PixArt (double_blocks.0.img_attn.qkv,
joint_blocks.0.x_block.attn.qkv, blocks.0.attn.qkv; formats/checkpoint_names, fused modules via formats/fused.py).
These are ComfyUI's "generic" LoRA keys (comfy/lora.py: model_lora_keys_unet / model_lora_keys_clip map every
".weight" of its model to them), the layout its LoraSave node writes; ComfyUI applies each module's alpha / rank,
so every module keeps its own alpha. Read: peft-style lora_A / lora_B suffixes too (as some trainers write them).
Hand-written: no library writes these keys.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from quantune.errors import QuantuneError
from quantune.formats import original
from quantune.formats.checkpoint_names import architecture_in, architecture_of
from quantune.formats.kohya import CLIP_ROOTS
from quantune.formats.unet_names import LDM_ROOTS, UNetLayout, diffusers_to_ldm_path, read_ldm_path
from quantune.lora.weights import LoraWeights

logger = logging.getLogger(__name__)
PREFIX = "diffusion_model."
TEXT_PREFIX = "text_encoders."
SD1_LAYOUT = UNetLayout(2, (False, True, True, True))  # SD-1.x / 2.x: four levels, the first up block attention-free


def is_comfyui(keys) -> bool:
    return any(k.startswith((PREFIX, TEXT_PREFIX)) for k in keys)


def encoder_name(component: str, model: nn.Module | None) -> str:
    """ComfyUI's name of a text encoder: T5 is t5xxl; a second CLIP is OpenCLIP-G (SDXL, SD3); the first CLIP is
    CLIP-L, or OpenCLIP-H for SD-2.x (width 1024)."""
    if type(model).__name__.startswith("T5"):
        return "t5xxl"
    if component == "text_encoder_2":
        return "clip_g"
    width = getattr(getattr(model, "config", None), "hidden_size", None)
    return "clip_h" if width == 1024 else "clip_l"


def _unet_layout(weights: LoraWeights, unet: nn.Module | None) -> UNetLayout:
    if unet is not None:
        return UNetLayout.of(unet)
    sdxl = any(k.startswith("text_encoder_2.") for k in weights)
    logger.warning("comfyui names: assuming the standard %s UNet; pass --model else", "SDXL" if sdxl else "SD-1.x")
    return UNetLayout() if sdxl else SD1_LAYOUT


def to_comfyui(weights: LoraWeights, components: dict[str, nn.Module]) -> tuple[dict[str, torch.Tensor], dict]:
    """ComfyUI's keys for canonical weights; `components`: the pipeline's (needed for a transformer)."""
    sd: dict[str, torch.Tensor] = {}
    ours = {k[12:]: m for k, m in weights.items() if k.startswith("transformer.")}
    if ours:
        model = components.get("transformer")
        sd.update(original.to_tensors(ours, model, lambda name: PREFIX + name, "comfyui"))
    unet = {k[5:]: m for k, m in weights.items() if k.startswith("unet.")}
    layout = _unet_layout(weights, components.get("unet")) if unet else None
    for path, mod in unet.items():
        sd.update({f"{PREFIX}{diffusers_to_ldm_path(path, layout)}.{s}": t for s, t in _tensors(mod, path).items()})
    for key, mod in weights.items():
        component, _, path = key.partition(".")
        if not component.startswith("text_encoder"):
            continue
        encoder = encoder_name(component, components.get(component))
        if encoder != "t5xxl" and path.startswith(CLIP_ROOTS):
            path = "text_model." + path  # transformers 5 dropped CLIP's text_model level; ComfyUI's CLIP has it
        name = f"{TEXT_PREFIX}{encoder}.transformer.{path}"
        sd.update({f"{name}.{s}": t for s, t in _tensors(mod, key).items()})
    return sd, {"format": "pt"}


def _tensors(mod, key: str) -> dict[str, torch.Tensor]:
    if getattr(mod, "soft", False):
        raise QuantuneError(f"{key} is a soft conv LoRA, which ComfyUI cannot load: use conv_mode='hard'")
    return mod.kohya_tensors()


def from_comfyui(sd: dict[str, torch.Tensor], components: dict[str, nn.Module]) -> LoraWeights:
    """Canonical weights of a ComfyUI file; a transformer's (and a T5's) need the pipeline's `components`."""
    denoiser = {k[len(PREFIX) :]: v for k, v in sd.items() if k.startswith(PREFIX)}
    text = {k[len(TEXT_PREFIX) :]: v for k, v in sd.items() if k.startswith(TEXT_PREFIX)}
    stray = next((k for k in sd if not k.startswith((PREFIX, TEXT_PREFIX))), None)
    if stray is not None:
        raise QuantuneError(f"key {stray!r} of a ComfyUI LoRA has no diffusion_model. / text_encoders. prefix")
    weights = _denoiser_part(denoiser, components)
    names = {encoder_name(c, m): c for c, m in components.items() if c.startswith("text_encoder")}
    names = names or {"clip_l": "text_encoder", "clip_h": "text_encoder", "clip_g": "text_encoder_2"}
    for key, module in original.modules_of(text, lambda k: k, "comfyui").items():
        encoder, _, path = key.partition(".transformer.")
        if encoder not in names:
            raise QuantuneError(f"ComfyUI text encoder {encoder!r} is not in this model: pass --model of its pipeline")
        weights[f"{names[encoder]}.{path}"] = module
    return weights


def _denoiser_part(sd: dict[str, torch.Tensor], components: dict[str, nn.Module]) -> LoraWeights:
    if not sd:
        return {}
    model = components.get("transformer")
    if architecture_of(model) is not None:
        parts = original.from_tensors(sd, model, lambda k: k, "comfyui")
        return {f"transformer.{p}": m for p, m in parts.items()}
    named = architecture_in(sd)
    if named is not None:
        raise QuantuneError(
            f"this ComfyUI file is a {named.name} LoRA: read it with --model of a {named.name} pipeline"
        )
    stray = next((k for k in sd if not k.startswith(LDM_ROOTS)), None)
    if stray is not None:
        raise QuantuneError(f"ComfyUI module {stray.rsplit('.lora', 1)[0]!r} is no UNet module quantune knows: a "
                            "transformer's LoRA? read it with --model of its pipeline")  # fmt: skip
    unet = components.get("unet")
    lpb = UNetLayout.of(unet).layers_per_block if unet is not None else 2
    modules = original.modules_of(sd, lambda k: k, "comfyui")
    return {f"unet.{read_ldm_path(path, lpb, unet is not None)}": m for path, m in modules.items()}
