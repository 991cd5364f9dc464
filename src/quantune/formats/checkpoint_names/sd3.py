"""SD3 / SD3.5's original (Stability's MMDiT) module names, as kohya sd-scripts' networks/lora_sd3.py and ComfyUI
use them, against diffusers' `SD3Transformer2DModel`:

    joint_blocks.{i}.x_block.attn.qkv        = transformer_blocks.{i}.attn.to_q | to_k | to_v         (fused)
    joint_blocks.{i}.context_block.attn.qkv  = transformer_blocks.{i}.attn.add_q_proj | add_k_proj | add_v_proj
    joint_blocks.{i}.x_block.attn2.qkv       = transformer_blocks.{i}.attn2.to_q | to_k | to_v   (SD3.5's dual)
    joint_blocks.{i}.x_block.mlp.fc1         = transformer_blocks.{i}.ff.net.0.proj, and the other 1:1 names below

The last block's context stream has no attention output or MLP (context_pre_only); its adaLN modulation, like the
final layer's, is stored with the shift / scale halves swapped, so neither is mapped.
"""

from __future__ import annotations

from torch import nn

from quantune.formats.checkpoint_names import Architecture, blocks, existing
from quantune.formats.fused import Table

JOINT = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "x_block.attn.proj": ("attn.to_out.0",),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "x_block.attn2.proj": ("attn2.to_out.0",),
    "x_block.mlp.fc1": ("ff.net.0.proj",),
    "x_block.mlp.fc2": ("ff.net.2",),
    "x_block.adaLN_modulation.1": ("norm1.linear",),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "context_block.attn.proj": ("attn.to_add_out",),
    "context_block.mlp.fc1": ("ff_context.net.0.proj",),
    "context_block.mlp.fc2": ("ff_context.net.2",),
}
CONTEXT_MODULATION = {"context_block.adaLN_modulation.1": ("norm1_context.linear",)}  # not in the last block
GLOBAL = {
    "x_embedder.proj": "pos_embed.proj",
    "context_embedder": "context_embedder",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
}


def table(model: nn.Module) -> Table:
    out = existing(model, GLOBAL) | blocks(model, "transformer_blocks", "joint_blocks", JOINT)
    last = len(model.transformer_blocks) - 1
    modulation = blocks(model, "transformer_blocks", "joint_blocks", CONTEXT_MODULATION)
    return out | {k: v for k, v in modulation.items() if not k.startswith(f"joint_blocks.{last}.")}


def modelspec(model: nn.Module) -> str:
    """As sd-scripts' SD3 merge script names them: SD3.5-medium has dual-attention layers, SD3.5-large qk-norm only."""
    config = model.config
    if config.dual_attention_layers:
        return "stable-diffusion-3-5-medium/lora"
    return "stable-diffusion-3-5-large/lora" if config.qk_norm else "stable-diffusion-3-medium/lora"


ARCHITECTURE = Architecture(
    name="SD3",
    model_class="SD3Transformer2DModel",
    table=table,
    modelspec=modelspec,
    roots=("joint_blocks",),
    t5_component="text_encoder_3",
)
