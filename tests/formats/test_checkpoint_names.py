"""The original-checkpoint name tables (formats/checkpoint_names) against diffusers' own single-file converters.

An original checkpoint is assembled from a diffusers model by the table (a fused module: its parts' weights
concatenated in the table's row order), plus the few non-Linear tensors listed here; diffusers' converter must turn
it back into the model's state dict. SD3: with a ComfyUI LoRA applied the way ComfyUI applies one (W += alpha / r up
@ down on the original, fused weight), it must give the model with the same LoRA merged, so names, fusion order
and the block-diagonal factors are all checked. FLUX: diffusers' converter splits single_blocks.N.linear1 with
FLUX.1's real width (3072) hard-coded, so a full-width FLUX (one block of each kind) is checked on the meta device
(names and shapes); FLUX's values are checked by diffusers' own LoRA loader on ComfyUI and kohya files
(tests/families/test_formats.py).
"""

from __future__ import annotations

import torch
from diffusers.loaders.single_file_utils import (
    convert_flux_transformer_checkpoint_to_diffusers,
    convert_sd3_transformer_checkpoint_to_diffusers,
)

from quantune.formats.checkpoint_names import architecture_of
from quantune.formats.comfyui import PREFIX, to_comfyui
from quantune.lora.layers import LoraModule
from quantune.models import load_pipeline


def _swap(t: torch.Tensor) -> torch.Tensor:
    """The original adaLN halves are (shift, scale), diffusers' (scale, shift)."""
    shift, scale = t.chunk(2, dim=0)
    return torch.cat([scale, shift])


def _original(model, extra: dict[str, tuple[str, bool]]) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    out = {}
    for name, paths in architecture_of(model).table(model).items():
        for kind in ("weight", "bias"):
            parts = [sd.get(f"{p}.{kind}") for p in paths]
            if all(t is not None for t in parts):
                out[f"{name}.{kind}"] = torch.cat(parts)
    for name, (path, swap) in extra.items():
        out[name] = _swap(sd[path]) if swap else sd[path]
    return out


def _sd3_extra(model) -> dict[str, tuple[str, bool]]:
    extra = {"pos_embed": ("pos_embed.pos_embed", False)}
    last = len(model.transformer_blocks) - 1
    for i in range(last + 1):
        j, t = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        norms = {"x_block.attn.ln_q": "attn.norm_q", "x_block.attn.ln_k": "attn.norm_k"}
        norms |= {"context_block.attn.ln_q": "attn.norm_added_q", "context_block.attn.ln_k": "attn.norm_added_k"}
        if i in model.config.dual_attention_layers:
            norms |= {"x_block.attn2.ln_q": "attn2.norm_q", "x_block.attn2.ln_k": "attn2.norm_k"}
        extra |= {f"{j}.{a}.weight": (f"{t}.{b}.weight", False) for a, b in norms.items()}
    for kind in ("weight", "bias"):
        extra[f"joint_blocks.{last}.context_block.adaLN_modulation.1.{kind}"] = (
            f"transformer_blocks.{last}.norm1_context.linear.{kind}", True)  # fmt: skip
        extra[f"final_layer.adaLN_modulation.1.{kind}"] = (f"norm_out.linear.{kind}", True)
    return extra


def _random_loras(model) -> dict[str, LoraModule]:
    """A LoRA of its own rank and alpha on every mapped module, but only q and v of each fused q | k | v."""
    g = torch.Generator().manual_seed(0)
    weights = {}
    paths = [
        p for ps in architecture_of(model).table(model).values() for p in ps if not p.endswith(("to_k", "k_proj"))
    ]
    for n, path in enumerate(paths):
        layer = model.get_submodule(path)
        rank = 1 + n % 3
        shape = (rank, *layer.weight.shape[1:])
        up = torch.randn(layer.weight.shape[0], rank, *([1, 1] if layer.weight.dim() == 4 else []), generator=g)
        weights[path] = LoraModule(torch.randn(shape, generator=g) * 0.1, up * 0.1, float(1 + n % 4))
    return weights


def test_sd3_names_and_a_comfyui_lora_match_diffusers_converter():
    pipe = load_pipeline("zoo:tiny-sd3")
    model = pipe.transformer
    original = _original(model, _sd3_extra(model))
    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    assert set(converted) == set(model.state_dict())
    for key, tensor in model.state_dict().items():
        assert torch.equal(converted[key], tensor), key
    weights = _random_loras(model)
    sd, _ = to_comfyui({f"transformer.{p}": m for p, m in weights.items()}, {"transformer": model})
    patched = dict(original)
    for key in sd:
        if key.endswith(".lora_down.weight"):  # as ComfyUI applies it: on the original (fused) weight
            name = key[len(PREFIX) : -len(".lora_down.weight")]
            down, up = sd[key].flatten(1), sd[f"{PREFIX}{name}.lora_up.weight"].flatten(1)
            scale = float(sd[f"{PREFIX}{name}.alpha"]) / down.shape[0]
            patched[f"{name}.weight"] = patched[f"{name}.weight"] + (scale * up @ down).view_as(
                patched[f"{name}.weight"]
            )
    merged = convert_sd3_transformer_checkpoint_to_diffusers(patched)
    expected = model.state_dict()
    for path, mod in weights.items():
        expected[f"{path}.weight"] = expected[f"{path}.weight"] + mod.delta()
    for key, tensor in expected.items():
        torch.testing.assert_close(merged[key], tensor, atol=1e-6, rtol=0, msg=key)


def test_flux_names_at_full_width_match_diffusers_converter():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)  # FLUX.1-dev width
    extra = {"final_layer.adaLN_modulation.1.weight": ("norm_out.linear.weight", True),
             "final_layer.adaLN_modulation.1.bias": ("norm_out.linear.bias", True)}  # fmt: skip
    for a, b in (("query_norm", "norm_q"), ("key_norm", "norm_k")):
        extra[f"double_blocks.0.img_attn.norm.{a}.scale"] = (f"transformer_blocks.0.attn.{b}.weight", False)
        extra[f"double_blocks.0.txt_attn.norm.{a}.scale"] = (
            f"transformer_blocks.0.attn.{b.replace('norm_', 'norm_added_')}.weight", False)  # fmt: skip
        extra[f"single_blocks.0.norm.{a}.scale"] = (f"single_transformer_blocks.0.attn.{b}.weight", False)
    converted = convert_flux_transformer_checkpoint_to_diffusers(_original(model, extra))
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    assert {k: tuple(t.shape) for k, t in converted.items()} == shapes
