"""PixArt-alpha / Sigma's original module names (PixArt's repository, ComfyUI's PixArt model), against diffusers'
`PixArtTransformer2DModel`:

    blocks.{i}.attn.qkv               = transformer_blocks.{i}.attn1.to_q | to_k | to_v   (fused)
    blocks.{i}.cross_attn.q_linear    = transformer_blocks.{i}.attn2.to_q
    blocks.{i}.cross_attn.kv_linear   = transformer_blocks.{i}.attn2.to_k | to_v           (fused)
    blocks.{i}.mlp.fc1                = transformer_blocks.{i}.ff.net.0.proj, and the other 1:1 names below

kohya sd-scripts does not train PixArt, so there are no kohya PixArt names (quantune writes none); ComfyUI's are
these with "diffusion_model.".
"""

from __future__ import annotations

from torch import nn

from quantune.formats.checkpoint_names import Architecture, blocks, existing
from quantune.formats.fused import Table

BLOCK = {
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "attn.proj": ("attn1.to_out.0",),
    "cross_attn.q_linear": ("attn2.to_q",),
    "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
    "cross_attn.proj": ("attn2.to_out.0",),
    "mlp.fc1": ("ff.net.0.proj",),
    "mlp.fc2": ("ff.net.2",),
}
GLOBAL = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
    "t_block.1": "adaln_single.linear",
    "y_embedder.y_proj.fc1": "caption_projection.linear_1",
    "y_embedder.y_proj.fc2": "caption_projection.linear_2",
    "final_layer.linear": "proj_out",
}


def table(model: nn.Module) -> Table:
    return existing(model, GLOBAL) | blocks(model, "transformer_blocks", "blocks", BLOCK)


ARCHITECTURE = Architecture(
    name="PixArt",
    model_class="PixArtTransformer2DModel",
    table=table,
    roots=("blocks",),
    t5_component="text_encoder",
    kohya=False,
)
