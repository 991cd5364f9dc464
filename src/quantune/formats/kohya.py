"""kohya sd-scripts / A1111 / ComfyUI LoRA files, converted by hand both ways.

Keys: "lora_unet_<path with '.' -> '_'>.lora_down.weight" (A), ".lora_up.weight" (B) and a scalar ".alpha";
text encoders "lora_te_" (SDXL: "lora_te1_", "lora_te2_"). The scale is alpha / r per module, and quantune writes
each module's own alpha so alpha / r survives exactly (diffusers' own kohya writer stores alpha = r, which
mis-scales a LoRA trained with alpha != r). Metadata carries kohya's `ss_network_*` fields.

Mixed alphas: diffusers' kohya reader (0.42) keys its per-module alpha_pattern with its old attention names
("attn1.processor.to_v_lora...") that peft never matches, so every module gets the most common alpha. When the
modules' alphas differ within a component, quantune therefore writes that component's most common alpha A* for all
its modules and folds the ratio into the up factor of the others (B' = B * alpha_i / A*): each module's update
(A* / r) B' A is unchanged, so kohya tools, A1111, ComfyUI and diffusers all apply the same deltas; the modules
with alpha A* keep their factors bit-exact.

The flattened names lose the dots; they are restored against the model's own module names when a model is given,
else by a vocabulary of the multi-word names in diffusers' UNet and CLIP (down_blocks, to_q, self_attn, ...).
"""

from __future__ import annotations

import json
import logging
from collections import Counter

import torch
from torch import nn

from quantune.errors import QuantuneError
from quantune.formats import original
from quantune.formats.checkpoint_names import architecture_in, architecture_of
from quantune.formats.unet_names import DIFFUSERS_ROOTS, LDM_ROOTS, UNetLayout, diffusers_to_ldm_path, read_ldm_path
from quantune.lora.adapter import group_by_module, module_from_kohya
from quantune.lora.weights import LoraWeights

logger = logging.getLogger(__name__)
PREFIXES = {
    "unet": "lora_unet_",
    "text_encoder": "lora_te_",
    "text_encoder_2": "lora_te2_",
    "transformer": "lora_unet_",
}
T5_PREFIX = "lora_te3_"  # kohya sd-scripts' T5 (FLUX's and SD3's), "ComfyUI compatible"
_READ_PREFIXES = [
    ("lora_unet_", "unet"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te_", "text_encoder"),
]
# Names in diffusers' UNet / CLIP that contain "_" themselves (longest first when joining tokens).
_VOCAB = {
    "input_blocks",
    "middle_block",
    "output_blocks",
    "time_embed",
    "label_emb",
    "in_layers",
    "out_layers",
    "emb_layers",
    "skip_connection",
    "down_blocks",
    "up_blocks",
    "mid_block",
    "transformer_blocks",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "proj_in",
    "proj_out",
    "conv_shortcut",
    "time_emb_proj",
    "conv_in",
    "conv_out",
    "conv_norm_out",
    "time_embedding",
    "linear_1",
    "linear_2",
    "add_embedding",
    "text_model",
    "self_attn",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "layer_norm1",
    "layer_norm2",
    "final_layer_norm",
    "encoder_hid_proj",
    "class_embedding",
    "add_k_proj",
    "add_v_proj",
    "add_q_proj",
    "to_add_out",
    "norm_out",
    "pos_embed",
    "time_text_embed",
    "context_embedder",
    "text_projection",
    "proj_mlp",
    "ff_context",
}


CLIP_ROOTS = ("encoder.", "embeddings.", "final_layer_norm")  # CLIP paths transformers 5 writes without text_model.


def _prefix(component: str, arch, numbered: bool) -> str:
    """kohya's prefix of a component: lora_te1_ / lora_te2_ for two CLIPs (SDXL, SD3; FLUX's CLIP-L is lora_te1_
    too), lora_te3_ for a transformer's T5."""
    if arch is not None and component == arch.t5_component:
        return T5_PREFIX
    return "lora_te1_" if (component == "text_encoder" and numbered) else PREFIXES[component]


def kohya_unet_layout(weights: LoraWeights, unet: nn.Module | None = None) -> UNetLayout | None:
    """The Stability UNet layout an SDXL file's names follow, or None for SD-1.x / 2.x (diffusers names). With the
    model: an SDXL UNet (`addition_embed_type = "text_time"`); without: a LoRA that adapts a second text encoder is
    taken for one of the standard SDXL UNet (pass the model for another)."""
    if unet is not None:
        return UNetLayout.of(unet) if getattr(unet.config, "addition_embed_type", None) == "text_time" else None
    if not any(k.startswith("text_encoder_2.") for k in weights):
        if any(k.startswith("unet.") for k in weights):
            logger.debug("kohya names: the UNet written with diffusers' names (the SD-1.x / 2.x convention); "
                         "for an SDXL LoRA pass --model")  # fmt: skip
        return None
    logger.warning("kohya names: assuming the standard SDXL UNet (3 levels, 2 layers per block); pass --model else")
    return UNetLayout()


def to_kohya(weights: LoraWeights, unet: nn.Module | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """kohya's keys; SDXL's UNet modules under the Stability names kohya sd-scripts and A1111 use, a diffusion
    transformer's under its original checkpoint's (BFL's FLUX, Stability's MMDiT; formats/checkpoint_names).
    `unet`: the pipeline's denoiser (a UNet or a transformer)."""
    arch = architecture_of(unet)
    every = dict(weights)  # for the metadata: every module, the transformer's too
    sd: dict[str, torch.Tensor] = {}
    if (arch is not None and not arch.kohya) or (arch is None and any(k.startswith("transformer.") for k in weights)):
        what = f"kohya sd-scripts has no {arch.name} LoRA names" if arch else "write it with --model of its pipeline"
        raise QuantuneError(f"kohya names of this diffusion transformer: {what} (or write diffusers / peft)")
    if any(k.startswith("transformer.") for k in weights):
        ours = {k[12:]: m for k, m in weights.items() if k.startswith("transformer.")}
        sd.update(original.to_tensors(ours, unet, lambda name: "lora_unet_" + name.replace(".", "_"), "kohya"))
        weights = {k: m for k, m in weights.items() if not k.startswith("transformer.")}
    layout = None if arch else kohya_unet_layout(weights, unet)
    common = {}  # per component, as diffusers builds one peft config per component
    for key, mod in weights.items():
        common.setdefault(key.split(".")[0], Counter())[mod.alpha] += 1
    common = {c: counts.most_common(1)[0][0] for c, counts in common.items()}
    # kohya: lora_te1_, _te2_ for SDXL and SD3 (CLIP-L, CLIP-G); FLUX's CLIP-L is lora_te1_ too
    numbered = layout is not None or arch is not None or any(k.startswith("text_encoder_2.") for k in weights)
    for key, mod in weights.items():
        if getattr(mod, "soft", False):
            raise QuantuneError(f"{key} is a soft conv LoRA, which kohya tools cannot load: use conv_mode='hard'")
        component, _, path = key.partition(".")
        prefix = _prefix(component, arch, numbered)
        if component.startswith("text_encoder") and prefix != T5_PREFIX and path.startswith(CLIP_ROOTS):
            path = "text_model." + path  # transformers 5 dropped CLIP's text_model level; kohya tools expect it
        if component == "unet" and layout is not None:
            path = diffusers_to_ldm_path(path, layout)
        name = prefix + path.replace(".", "_")
        for suffix, tensor in mod.with_alpha(common[component]).kohya_tensors().items():
            sd[f"{name}.{suffix}"] = tensor
    return sd, _metadata(every, weights, arch.modelspec(unet) if arch else _unet_architecture(layout))


def _metadata(every: LoraWeights, rest: LoraWeights, architecture: str) -> dict[str, str]:
    """kohya's `ss_network_*` fields over every module, and modelspec's architecture name."""
    ranks = Counter(m.rank for m in every.values()).most_common(1)[0][0]
    common_alpha = Counter(m.alpha for m in every.values()).most_common(1)[0][0]
    conv = any(t.dim() == 4 for m in rest.values() for t in m.tensors())
    args = {"conv_dim": ranks, "conv_alpha": common_alpha} if conv else {}
    kinds = Counter(getattr(m, "inner", m).kind for m in every.values())
    lycoris = set(kinds) != {"lora"} or any(m.kind == "dora" for m in every.values())
    if lycoris:  # LyCORIS's kohya network: its algo and DoRA flag, as lycoris.kohya writes them
        algo = kinds.most_common(1)[0][0]
        dora = any(m.kind == "dora" for m in every.values())
        args.update({"algo": "locon" if algo == "lora" else algo, "dora_wd": dora})
    return {
        "ss_network_module": "lycoris.kohya" if lycoris else "networks.lora",
        "ss_network_dim": str(ranks),
        "ss_network_alpha": str(common_alpha),
        "ss_network_args": json.dumps(args),
        "modelspec.architecture": architecture,
    }


def _unet_architecture(layout) -> str:
    return "stable-diffusion-xl-v1-base/lora" if layout else "stable-diffusion-v1/lora"


def unflatten(flat: str, names: list[str] | None = None) -> str:
    """Restore the dots of a kohya module name, exactly against `names` when given, else by vocabulary."""
    if names is not None:
        lookup = {n.replace(".", "_"): n for n in names}
        if flat in lookup:
            return lookup[flat]
    tokens = flat.split("_")
    out, i = [], 0
    while i < len(tokens):
        for n in (3, 2, 1):
            word = "_".join(tokens[i : i + n])
            if n == 1 or word in _VOCAB:
                out.append(word)
                i += n
                break
    return ".".join(out)


def _transformer_part(sd: dict[str, torch.Tensor], components: dict[str, nn.Module]) -> LoraWeights:
    """The diffusion transformer's modules of a kohya file (original names), read against the model; {} if none."""
    model = components.get("transformer")
    arch = architecture_of(model)
    if arch is not None and not arch.kohya:
        raise QuantuneError(f"kohya sd-scripts has no {arch.name} LoRA names: this file is not for {arch.name}")
    prefix = PREFIXES["transformer"]
    if arch is not None:
        lookup = {name.replace(".", "_"): name for name in arch.table(model)}
        ours = {k: v for k, v in sd.items() if k.startswith(prefix)}
        parts = original.from_tensors(ours, model, lambda k: lookup.get(k[len(prefix) :], k[len(prefix) :]), "kohya")
        return {f"transformer.{p}": m for p, m in parts.items()}
    named = architecture_in(k[len(prefix) :] for k in sd if k.startswith(prefix))
    if named is not None:
        raise QuantuneError(f"this kohya file is a {named.name} LoRA: read it with --model of a {named.name} pipeline")
    return {}


def from_kohya(sd: dict[str, torch.Tensor], components: dict[str, nn.Module] | None = None) -> LoraWeights:
    components = components or {}
    weights = _transformer_part(sd, components)
    arch = architecture_of(components.get("transformer"))
    if arch is not None:  # every lora_unet_ key was the transformer's
        sd = {k: v for k, v in sd.items() if not k.startswith(PREFIXES["transformer"])}
    names = {c: [n for n, _ in m.named_modules()] for c, m in components.items()}
    unet = components.get("unet")
    lpb = UNetLayout.of(unet).layers_per_block if unet is not None and hasattr(unet.config, "up_block_types") else 2
    grouped = group_by_module(sd)
    unknown = [k for k in sd if not any(k.startswith(m + ".") and k[len(m) + 1 :] in t for m, t in grouped.items())]
    if unknown:
        raise QuantuneError(
            f"unsupported keys in a kohya file, e.g. {unknown[0]!r} (quantune reads LoRA / LoCon, LoHa, LoKr, DoRA)"
        )
    read_prefixes = [(T5_PREFIX, arch.t5_component)] if arch is not None else []
    for flat_full, tensors in grouped.items():
        match = next(((p, c) for p, c in read_prefixes + _READ_PREFIXES if flat_full.startswith(p)), None)
        if match is None:
            what = "a T5 LoRA: read it with --model of its pipeline" if flat_full.startswith(T5_PREFIX) else (
                "no lora_unet_ / lora_te_ prefix: not a kohya LoRA")  # fmt: skip
            raise QuantuneError(f"kohya key {flat_full!r}: {what}")
        prefix, component = match
        path = unflatten(flat_full[len(prefix) :], names.get(component))
        if component == "unet" and path.startswith(LDM_ROOTS):  # an SDXL file: Stability's UNet names
            path = read_ldm_path(path, lpb, known_layout=unet is not None)
        elif component == "unet" and unet is None and not path.startswith(DIFFUSERS_ROOTS):
            raise QuantuneError(f"kohya module {flat_full!r} is no UNet module quantune knows: a transformer's LoRA? "
                                "read it with --model of its pipeline")  # fmt: skip
        weights[f"{component}.{path}"] = module_from_kohya(tensors, flat_full)
    return weights
