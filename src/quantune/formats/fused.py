"""LoRA on a fused Linear: one original-checkpoint module standing for several diffusers ones, both ways.

The original checkpoints of the diffusion transformers fuse q, k and v (FLUX's single blocks: and the MLP input;
PixArt's cross attention: k and v) into one Linear whose output rows are the parts' rows in order. A LoRA on the
fused Linear is written exactly from the parts' LoRAs: the parts' down factors stacked, their up factors
block-diagonal (each part padded with zeros to the largest rank, a part without a LoRA all zeros), each part's own
scale alpha_j / r_j folded into its down factor relative to the most common scale s, and alpha = s x the fused rank;
so every part's update s_j B_j A_j is unchanged. This is the sparse layout diffusers' kohya FLUX reader and ComfyUI
split or apply exactly.

Read: a block-diagonal LoRA is split into its parts (a part whose up block is all zero is no LoRA, so a part
exported untrained is dropped; a read-back part keeps the padded rank, its update unchanged); a LoRA whose parts
share one down factor (dense up, as trainers on the fused Linear write) gives every part that down factor, with its
up rows. Hand-written: no library converts LoRAs between fused and split Linears both ways.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from quantune.errors import QuantuneError
from quantune.lora.layers import LoraModule

Table = dict[str, tuple[str, ...]]  # original module name -> the diffusers paths it fuses, in row order


def out_features(model: nn.Module, path: str) -> int:
    """The output width of the Linear (or Conv2d) at `path`, a LoRA-wrapped or integer one too."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise QuantuneError(f"the model has no layer {path!r}: this LoRA is for another model") from None
    module = getattr(module, "base_layer", module)
    width = getattr(module, "out_features", None) or getattr(module, "out_channels", None)
    return int(width if width is not None else module.weight.shape[0])


def fuse(parts: list[LoraModule | None], dims: list[int]) -> LoraModule:
    """One LoRA (down [n R, in], block-diagonal up [sum d, n R]) for the parts (None: no LoRA on that part)."""
    present = [m for m in parts if m is not None]
    if len(parts) == 1:
        return present[0]
    other = next((m for m in present if not isinstance(m, LoraModule)), None)
    if other is not None:
        label = getattr(other, "label", other.kind)
        raise QuantuneError(f"a {label} adapter on a module the original checkpoint fuses with others has no exact "
                            "fused form: write diffusers, peft or quantune")  # fmt: skip
    rank = max(m.rank for m in present)
    scale = Counter(m.scale for m in present).most_common(1)[0][0]
    ref = present[0].down
    downs, ups = [], []
    for m, d in zip(parts, dims):
        down = torch.zeros(rank, *ref.shape[1:], dtype=ref.dtype)
        up = torch.zeros(d, rank * len(parts), dtype=ref.dtype)
        if m is not None:
            down[: m.rank] = (m.down.float() * (m.scale / scale)).to(ref.dtype)  # the product in fp32
            j = len(ups)
            up[:, j * rank : j * rank + m.rank] = m.up.flatten(1).to(ref.dtype)
        downs.append(down)
        ups.append(up)
    return LoraModule(torch.cat(downs), torch.cat(ups), scale * rank * len(parts))


def split(paths: tuple[str, ...], dims: list[int], fused: LoraModule) -> dict[str, LoraModule]:
    """The parts' LoRAs of a LoRA on the fused Linear (see the module docstring for the two layouts)."""
    if len(paths) == 1:
        return {paths[0]: fused}
    if not isinstance(fused, LoraModule):
        raise QuantuneError(f"a {getattr(fused, 'label', fused.kind)} adapter on the fused {paths[0]}... cannot be "
                            "split into its parts exactly: quantune reads LoRAs on fused modules")  # fmt: skip
    down, up, alpha = fused.down, fused.up, fused.alpha
    rank, n = down.shape[0], len(paths)
    if sum(dims) != up.shape[0]:
        raise QuantuneError(f"a fused LoRA has {up.shape[0]} output rows where {paths[0]}... have {sum(dims)}")
    rows = torch.split(up, dims, dim=0)
    r = rank // n
    sparse = rank % n == 0 and all(
        not rows[j][:, k * r : (k + 1) * r].any() for j in range(n) for k in range(n) if j != k
    )
    out = {}
    for j, path in enumerate(paths):
        if sparse:
            block = rows[j][:, j * r : (j + 1) * r]
            if block.any():
                out[path] = LoraModule(down[j * r : (j + 1) * r].clone(), block.clone(), alpha / rank * r)
        else:
            out[path] = LoraModule(down.clone(), rows[j].clone(), alpha)
    return out


def to_original(weights: dict[str, LoraModule], table: Table, model: nn.Module, what: str) -> dict[str, LoraModule]:
    """The model's LoRAs (diffusers paths) as LoRAs on the original modules; a path no entry covers is refused."""
    named = {p for paths in table.values() for p in paths}
    stray = sorted(set(weights) - named)
    if stray:
        raise QuantuneError(f"module {stray[0]!r} has no {what} name quantune writes: write diffusers or peft instead")
    out = {}
    for name, paths in table.items():
        if any(p in weights for p in paths):
            out[name] = fuse([weights.get(p) for p in paths], [out_features(model, p) for p in paths])
    return out


def from_original(modules: dict[str, LoraModule], table: Table, model: nn.Module, what: str) -> dict[str, LoraModule]:
    """LoRAs on the original modules -> the model's LoRAs (diffusers paths); a name not in the table is refused."""
    out: dict[str, LoraModule] = {}
    for name, module in modules.items():
        if name not in table:
            raise QuantuneError(f"{what} module {name!r} is not in this model (or not one of its LoRA names)")
        paths = table[name]
        out.update(split(paths, [out_features(model, p) for p in paths], module))
    return out
