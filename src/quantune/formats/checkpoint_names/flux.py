"""FLUX.1's original (Black Forest Labs) module names, as kohya sd-scripts' networks/lora_flux.py and ComfyUI use
them, against diffusers' `FluxTransformer2DModel`:

    double_blocks.{i}.img_attn.qkv   = transformer_blocks.{i}.attn.to_q | to_k | to_v      (fused)
    double_blocks.{i}.txt_attn.qkv   = transformer_blocks.{i}.attn.add_q_proj | add_k_proj | add_v_proj
    single_blocks.{i}.linear1        = single_transformer_blocks.{i}.attn.to_q | to_k | to_v | proj_mlp
    double_blocks.{i}.img_attn.proj  = transformer_blocks.{i}.attn.to_out.0, and the other 1:1 names below

The final layer's adaLN modulation is stored with its shift / scale halves swapped, so it is not mapped. diffusers'
kohya FLUX reader drops the alpha of the modules outside the blocks (and 0.42 ignores them): they are written with
alpha = rank (0.42 ignores them all: tested; its converter's final_layer reader has no alphas).
"""

from __future__ import annotations

from torch import nn

from quantune.formats.checkpoint_names import Architecture, blocks, existing
from quantune.formats.fused import Table

DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "txt_mod.lin": ("norm1_context.linear",),
}
SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
GLOBAL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
}


def table(model: nn.Module) -> Table:
    return (
        existing(model, GLOBAL)
        | blocks(model, "transformer_blocks", "double_blocks", DOUBLE)
        | blocks(model, "single_transformer_blocks", "single_blocks", SINGLE)
    )


def modelspec(model: nn.Module) -> str:
    """FLUX.1-dev embeds a distilled guidance, schnell does not."""
    return "flux-1-dev/lora" if model.config.guidance_embeds else "flux-1-schnell/lora"


ARCHITECTURE = Architecture(
    name="FLUX.1",
    model_class="FluxTransformer2DModel",
    table=table,
    modelspec=modelspec,
    roots=("double_blocks", "single_blocks"),
    t5_component="text_encoder_2",
    rank_alpha=frozenset(GLOBAL),
)
