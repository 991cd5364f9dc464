"""LoRA on fused Linears (formats/fused.py) through kohya's FLUX (BFL) names: a fused module written from parts of
different ranks and scales is exact, and a file whose fused parts share one down factor (the dense layout) is read
as each part's own LoRA."""

from __future__ import annotations

import torch

from quantune.formats.fused import fuse, split
from quantune.formats.kohya import from_kohya
from quantune.lora.layers import LoraModule
from quantune.models import load_pipeline


def test_fusing_parts_of_different_ranks_and_scales_is_exact():
    g = torch.Generator().manual_seed(0)
    q = LoraModule(torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g), 1.0)
    v = LoraModule(torch.randn(4, 8, generator=g), torch.randn(6, 4, generator=g), 10.0)
    fused = fuse([q, None, v], [6, 6, 6])
    assert fused.down.shape == (12, 8) and fused.up.shape == (18, 12)  # padded to rank 4 per part, block-diagonal
    parts = split(("q", "k", "v"), [6, 6, 6], fused)
    assert set(parts) == {"q", "v"}  # k had no LoRA: its zero block is no LoRA when read back
    for name, mod in (("q", q), ("v", v)):
        torch.testing.assert_close(parts[name].delta(), mod.delta(), atol=1e-5, rtol=0)


def test_a_dense_fused_file_gives_every_part_the_shared_down_factor():
    pipe = load_pipeline("zoo:tiny-flux")
    width = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    g = torch.Generator().manual_seed(1)
    down, up = torch.randn(4, width, generator=g), torch.randn(3 * width, 4, generator=g)
    key = "lora_unet_double_blocks_0_img_attn_qkv"
    sd = {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)}
    parts = from_kohya(sd, {"transformer": pipe.transformer})
    assert set(parts) == {f"transformer.transformer_blocks.0.attn.to_{x}" for x in "qkv"}
    for j, x in enumerate("qkv"):
        expect = 0.5 * up[j * width : (j + 1) * width] @ down
        got = parts[f"transformer.transformer_blocks.0.attn.to_{x}"].delta()
        torch.testing.assert_close(got, expect, atol=1e-5, rtol=0)


def test_modules_outside_the_blocks_round_trip_with_alpha_equal_to_rank(tmp_path):
    from safetensors import safe_open

    from quantune.formats import read_lora, write_lora

    pipe = load_pipeline("zoo:tiny-flux")
    g = torch.Generator().manual_seed(2)
    model = pipe.transformer
    weights = {}
    for path in ("x_embedder", "proj_out", "transformer_blocks.0.norm1_context.linear"):
        layer = model.get_submodule(path)
        weights[f"transformer.{path}"] = LoraModule(
            torch.randn(2, layer.in_features, generator=g), torch.randn(layer.out_features, 2, generator=g), 6.0
        )
    path = write_lora(weights, tmp_path / "k.safetensors", "kohya", pipe=pipe)
    with safe_open(str(path), "pt") as f:
        assert float(f.get_tensor("lora_unet_img_in.alpha")) == 2.0  # the scale folded into the down factor
        assert "lora_unet_double_blocks_0_txt_mod_lin.lora_up.weight" in set(f.keys())
    back, fmt, _ = read_lora(path, pipe)
    assert fmt == "kohya" and set(back) == set(weights)
    for key, mod in weights.items():
        torch.testing.assert_close(back[key].delta(), mod.delta(), atol=1e-5, rtol=0)


def test_other_adapter_types_pass_unfused_modules_and_are_refused_on_fused_ones():
    import pytest

    from quantune.errors import QuantuneError

    pipe = load_pipeline("zoo:tiny-flux")
    key = "lora_unet_double_blocks_0_img_attn_proj"  # one diffusers module (attn.to_out.0)
    sd = {f"{key}.lora_down.weight": torch.zeros(2, 32), f"{key}.lora_up.weight": torch.zeros(32, 2),
          f"{key}.dora_scale": torch.ones(1, 32)}  # fmt: skip
    (mod,) = from_kohya(sd, {"transformer": pipe.transformer}).values()
    assert mod.kind == "dora" and mod.inner.kind == "lora"
    fused = "lora_unet_double_blocks_0_img_attn_qkv"  # q, k and v fused
    sd = {f"{fused}.{n}": torch.zeros(s) for n, s in [("hada_w1_a", (96, 2)), ("hada_w1_b", (2, 32)),
                                                      ("hada_w2_a", (96, 2)), ("hada_w2_b", (2, 32))]}  # fmt: skip
    with pytest.raises(QuantuneError, match="cannot be split into its parts exactly"):
        from_kohya(sd, {"transformer": pipe.transformer})
