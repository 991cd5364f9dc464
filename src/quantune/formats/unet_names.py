"""UNet module names: diffusers' `UNet2DConditionModel` paths and the original CompVis / Stability (LDM, SGM) paths.

kohya sd-scripts trains SDXL on the Stability UNet, so its SDXL LoRAs (and A1111's, ComfyUI's) name the UNet's
modules `input_blocks.I.J...`, `middle_block.J...`, `output_blocks.I.J...`; lora_wrapper's checkpoints use the
same CompVis names for SD-1.x. With L = layers_per_block:
- input_blocks.0.0 = conv_in; input_blocks.I (I >= 1): down block (I - 1) // (L + 1), layer (I - 1) % (L + 1), whose
  J = 0 is the resnet and J = 1 the attention; layer L is the block's downsampler (`.0.op`);
- middle_block.0 / .2 = mid_block.resnets.0 / .1, middle_block.1 = mid_block.attentions.0;
- output_blocks.I: up block I // (L + 1), layer I % (L + 1) (up blocks have L + 1 layers), J = 0 resnet,
  J = 1 attention when the block has one, and the upsampler `.conv` after them (J = 1 or 2);
- resnet inner names: in_layers.2 = conv1, out_layers.3 = conv2, emb_layers.1 = time_emb_proj,
  skip_connection = conv_shortcut; time_embed.0 / .2 = time_embedding.linear_1 / _2; label_emb.0.0 / .0.2 =
  add_embedding.linear_1 / _2 (SDXL); out.2 = conv_out. Attention internals are named alike in both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from quantune.errors import QuantuneError

_FIXED = {
    "input_blocks.0.0": "conv_in",
    "out.2": "conv_out",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
}
_SDXL_FIXED = {"label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}
_RESNET = {"in_layers.2": "conv1", "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj",
           "skip_connection": "conv_shortcut"}  # fmt: skip
LDM_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out.")
DIFFUSERS_ROOTS = (
    "down_blocks.",
    "mid_block.",
    "up_blocks.",
    "conv_in",
    "conv_out",
    "conv_norm_out",
    "time_embedding.",
    "class_embedding",
    "add_embedding.",
    "encoder_hid_proj",
)  # UNet2DConditionModel's top-level modules


@dataclass(frozen=True)
class UNetLayout:
    """What the name mapping needs of a UNet: layers per down block and which up blocks have attention."""

    layers_per_block: int = 2
    up_attention: tuple[bool, ...] = (True, True, False)  # SDXL's (CrossAttnUpBlock2D x 2, UpBlock2D)

    def __post_init__(self) -> None:
        if self.layers_per_block < 1:
            raise QuantuneError(f"layers_per_block must be >= 1, got {self.layers_per_block}")

    @classmethod
    def of(cls, unet) -> UNetLayout:
        config = unet.config
        lpb = config.layers_per_block
        lpb = lpb if isinstance(lpb, int) else lpb[0]
        return cls(lpb, tuple("CrossAttn" in t for t in config.up_block_types))


def _resnet(rest: str) -> str:
    if rest not in _RESNET:
        raise QuantuneError(f"CompVis resnet module {rest!r} is not mapped to diffusers")
    return _RESNET[rest]


def ldm_to_diffusers_path(path: str, layers_per_block: int = 2, sdxl: bool = False) -> str:
    """Map a CompVis / Stability UNet module path (no "model.diffusion_model." prefix) to diffusers' name; `sdxl`
    adds SDXL's added-condition embedding (label_emb)."""
    fixed = _FIXED | (_SDXL_FIXED if sdxl else {})
    if path in fixed:
        return fixed[path]
    L = layers_per_block
    m = re.match(r"^input_blocks\.(\d+)\.(\d+)\.(.+)$", path)
    if m:
        i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        block, layer = (i - 1) // (L + 1), (i - 1) % (L + 1)
        if layer == L and j == 0 and rest == "op":
            return f"down_blocks.{block}.downsamplers.0.conv"
        if layer == L:
            raise QuantuneError(f"CompVis module {path!r} (a downsampler) is not mapped: exclude it")
        return f"down_blocks.{block}.{'attentions' if j else 'resnets'}.{layer}.{_resnet(rest) if j == 0 else rest}"
    m = re.match(r"^middle_block\.(\d+)\.(.+)$", path)
    if m:
        j, rest = int(m.group(1)), m.group(2)
        return f"mid_block.attentions.0.{rest}" if j == 1 else f"mid_block.resnets.{j // 2}.{_resnet(rest)}"
    m = re.match(r"^output_blocks\.(\d+)\.(\d+)\.(.+)$", path)
    if m:
        i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        block, layer = i // (L + 1), i % (L + 1)
        if j > 0 and rest == "conv":  # the upsampler sits after the resnet (and the attention, if any)
            return f"up_blocks.{block}.upsamplers.0.conv"
        return f"up_blocks.{block}.{'attentions' if j else 'resnets'}.{layer}.{_resnet(rest) if j == 0 else rest}"
    raise QuantuneError(f"CompVis module {path!r} has no diffusers equivalent that quantune maps")


def read_ldm_path(path: str, layers_per_block: int, known_layout: bool) -> str:
    """ldm_to_diffusers_path of a LoRA file's name (SDXL's label_emb included); read without the model
    (`known_layout` False), a failure says that the standard layout was assumed."""
    try:
        return ldm_to_diffusers_path(path, layers_per_block, sdxl=True)
    except QuantuneError as e:
        if known_layout:
            raise
        raise QuantuneError(f"{e}; read without the model, 2 layers per block were assumed: pass --model") from e


def diffusers_to_ldm_path(path: str, layout: UNetLayout) -> str:
    """The inverse of ldm_to_diffusers_path for a UNet of `layout`."""
    inverse = {v: k for k, v in (_FIXED | _SDXL_FIXED).items()}
    if path in inverse:
        return inverse[path]
    L, resnet = layout.layers_per_block, {v: k for k, v in _RESNET.items()}
    m = re.match(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$", path)
    if m:
        side, block, kind, layer, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if kind in ("downsamplers", "upsamplers"):
            if rest != "conv":
                raise QuantuneError(f"diffusers module {path!r} has no CompVis name that quantune maps")
            if side == "down":
                return f"input_blocks.{1 + block * (L + 1) + L}.0.op"
            return f"output_blocks.{block * (L + 1) + L}.{2 if layout.up_attention[block] else 1}.conv"
        inner = resnet.get(rest) if kind == "resnets" else rest
        if inner is None:
            raise QuantuneError(f"diffusers resnet module {path!r} has no CompVis name that quantune maps")
        index = 1 + block * (L + 1) + layer if side == "down" else block * (L + 1) + layer
        return f"{'input' if side == 'down' else 'output'}_blocks.{index}.{1 if kind == 'attentions' else 0}.{inner}"
    m = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", path)
    if m:
        kind, k, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        if rest not in resnet:
            raise QuantuneError(f"diffusers resnet module {path!r} has no CompVis name that quantune maps")
        return f"middle_block.{2 * k}.{resnet[rest]}"
    raise QuantuneError(f"diffusers module {path!r} has no CompVis name that quantune maps")
