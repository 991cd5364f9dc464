"""kohya sd-scripts' FLUX.1 LoRA names (networks/lora_flux.py), which are Black Forest Labs' module names, both ways.

    lora_unet_double_blocks_{i}_img_attn_qkv   = transformer_blocks.{i}.attn.to_q | to_k | to_v      (fused)
    lora_unet_double_blocks_{i}_txt_attn_qkv   = transformer_blocks.{i}.attn.add_q_proj | add_k_proj | add_v_proj
    lora_unet_single_blocks_{i}_linear1        = single_transformer_blocks.{i}.attn.to_q | to_k | to_v | proj_mlp
    lora_unet_double_blocks_{i}_img_attn_proj  = transformer_blocks.{i}.attn.to_out.0, and the other 1:1 names below

BFL fuses q, k and v (and, in single blocks, the MLP input) into one Linear, so one kohya module stands for
several diffusers ones. Written exactly: the parts' down factors stacked, their up factors block-diagonal (each
part padded with zeros to the largest rank, a part without a LoRA all zeros), each part's own scale alpha_j / r_j
folded into its down factor relative to the most common scale s, and alpha = s x the fused rank; so every part's
update s_j B_j A_j is unchanged. This is the sparse layout diffusers' kohya FLUX reader splits back exactly.
Read: a block-diagonal file is split into its parts (a part whose up block is all zero is no LoRA, so a part
exported untrained is dropped; a read-back part keeps the padded rank, its update unchanged); a file whose parts
share one down factor (dense up) gives every part that down factor, with its up rows. The 1:1 modules outside the
blocks (img_in, txt_in, time_in, vector_in, guidance_in, final_layer_linear) are written with alpha = rank (the
scale folded into down), since diffusers' reader drops their alpha; diffusers 0.42 ignores them altogether.
Hand-written: no library converts these names both ways (diffusers reads them only).
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
from torch import nn

from quantune.errors import QuantuneError
from quantune.lora.layers import LoraModule

logger = logging.getLogger(__name__)
PREFIX = "lora_unet_"
DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "txt_mod_lin": ("norm1_context.linear",),
}
SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
GLOBAL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "final_layer_linear": "proj_out",
}


def is_flux(model) -> bool:
    return type(model).__name__ == "FluxTransformer2DModel"


def groups(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """kohya name (without the prefix) -> the diffusers module paths it fuses, for this model's blocks."""
    out = {name: (path,) for name, path in GLOBAL.items()}
    for i in range(len(model.transformer_blocks)):
        out.update(
            {f"double_blocks_{i}_{n}": tuple(f"transformer_blocks.{i}.{p}" for p in ps) for n, ps in DOUBLE.items()}
        )
    for i in range(len(model.single_transformer_blocks)):
        out.update(
            {
                f"single_blocks_{i}_{n}": tuple(f"single_transformer_blocks.{i}.{p}" for p in ps)
                for n, ps in SINGLE.items()
            }
        )
    return out


def to_bfl(weights: dict[str, LoraModule], model: nn.Module) -> dict[str, torch.Tensor]:
    """The transformer's modules (diffusers paths -> LoRA) as kohya FLUX tensors."""
    table = groups(model)
    named = {p for paths in table.values() for p in paths}
    stray = sorted(set(weights) - named)
    if stray:
        raise QuantuneError(
            f"FLUX module {stray[0]!r} has no kohya (BFL) name quantune writes: write diffusers or peft instead"
        )
    dropped = sorted(n for n, paths in table.items() if n in GLOBAL and paths[0] in weights)
    if dropped:
        logger.warning("kohya FLUX: diffusers 0.42's loader ignores %s (kohya tools and ComfyUI read them)",
                       ", ".join(dropped))  # fmt: skip
    sd: dict[str, torch.Tensor] = {}
    for name, paths in table.items():
        present = [p for p in paths if p in weights]
        if present:
            down, up, alpha = _fuse([weights.get(p) for p in paths], [_out_features(model, p) for p in paths])
            if name in GLOBAL:  # readers that ignore these modules' alpha (diffusers) get the update right too
                down, alpha = (down.float() * (alpha / down.shape[0])).to(down.dtype), float(down.shape[0])
            sd.update({f"{PREFIX}{name}.lora_down.weight": down, f"{PREFIX}{name}.lora_up.weight": up,
                       f"{PREFIX}{name}.alpha": torch.tensor(alpha)})  # fmt: skip
    return sd


def _fuse(parts: list[LoraModule | None], dims: list[int]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(down [n R, in], block-diagonal up [sum d, n R], alpha) of the parts (None: no LoRA on that part)."""
    present = [m for m in parts if m is not None]
    rank = max(m.rank for m in present)
    scale = Counter(m.scale for m in present).most_common(1)[0][0]
    ref = present[0].down
    downs, ups = [], []
    for m, d in zip(parts, dims):
        down = torch.zeros(rank, ref.shape[1], dtype=ref.dtype)
        up = torch.zeros(d, rank * len(parts), dtype=ref.dtype)
        if m is not None:
            down[: m.rank] = (m.down.flatten(1).float() * (m.scale / scale)).to(ref.dtype)  # fp32 product
            j = len(ups)
            up[:, j * rank : j * rank + m.rank] = m.up.flatten(1).to(ref.dtype)
        downs.append(down)
        ups.append(up)
    return torch.cat(downs), torch.cat(ups), scale * rank * len(parts)


def _out_features(model: nn.Module, path: str) -> int:
    """The output width of the Linear at `path` (a LoRA-wrapped or integer one too)."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise QuantuneError(f"the FLUX model has no Linear {path!r}: this LoRA is for another model") from None
    module = getattr(module, "base_layer", module)
    width = getattr(module, "out_features", None)
    return int(width if width is not None else module.weight.shape[0])


def from_bfl(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, LoraModule]:
    """kohya FLUX tensors (prefix included) -> diffusers paths -> LoRA."""
    table = groups(model)
    out: dict[str, LoraModule] = {}
    names = sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd})
    known = {f"{n}.{suffix}" for n in names for suffix in ("lora_down.weight", "lora_up.weight", "alpha")}
    unknown = sorted(set(sd) - known)
    if unknown or any(f"{n}.lora_down.weight" not in sd or f"{n}.lora_up.weight" not in sd for n in names):
        what = unknown[0] if unknown else next(n for n in names if f"{n}.lora_up.weight" not in sd)
        raise QuantuneError(
            f"unsupported kohya FLUX tensors, e.g. {what!r}: only plain LoRA (lora_down / lora_up / alpha) is read "
            "(LoHa, LoKr, DoRA and Tucker are not)"
        )
    for full in names:
        name = full[len(PREFIX) :]
        if name not in table:
            raise QuantuneError(f"kohya FLUX module {full!r} is not in this model (or not a FLUX LoRA name)")
        down, up = sd[f"{full}.lora_down.weight"], sd[f"{full}.lora_up.weight"]
        alpha = float(sd[f"{full}.alpha"]) if f"{full}.alpha" in sd else float(down.shape[0])
        paths = table[name]
        out.update(_split(paths, [_out_features(model, p) for p in paths], down, up, alpha))
    return out


def _split(paths, dims, down, up, alpha) -> dict[str, LoraModule]:
    if len(paths) == 1:
        return {paths[0]: LoraModule(down, up, alpha)}
    rank, n = down.shape[0], len(paths)
    if sum(dims) != up.shape[0]:
        raise QuantuneError(f"a fused kohya FLUX LoRA has {up.shape[0]} rows where {paths[0]}... has {sum(dims)}")
    rows = torch.split(up, dims, dim=0)
    scale = alpha / rank
    r = rank // n
    sparse = rank % n == 0 and all(
        not rows[j][:, k * r : (k + 1) * r].any() for j in range(n) for k in range(n) if j != k
    )
    out = {}
    for j, path in enumerate(paths):
        if sparse:
            block = rows[j][:, j * r : (j + 1) * r]
            if block.any():
                out[path] = LoraModule(down[j * r : (j + 1) * r].clone(), block.clone(), scale * r)
        else:
            out[path] = LoraModule(down.clone(), rows[j].clone(), alpha)
    return out
