"""LoRA files of every family with the real loaders: diffusers' `load_lora_weights` of the family's pipeline on
quantune's diffusers and kohya exports, peft's `PeftModel.from_pretrained` on the peft export, and every format
round trip, all reproducing quantune's own wrapped model (fp32, atol 1e-5 on O(1) outputs)."""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors import safe_open

from quantune.errors import QuantuneError
from quantune.families import family_of
from quantune.formats import WRITABLE, read_lora, write_lora
from quantune.lora import LoraConfig, add_lora, get_lora_weights
from quantune.lora.weights import apply_lora
from quantune.models import load_pipeline
from tests.conftest import randomize_lora
from tests.families.conftest import MODELS, family_outputs

ATOL = 1e-5
# as kohya sd-scripts and A1111 write them (FLUX: CLIP-L is lora_te1_; SD3: CLIP-L, CLIP-G are lora_te1_, lora_te2_)
KOHYA_TEXT_PREFIXES = {"sd": {"lora_te_"}, "sdxl": {"lora_te1_", "lora_te2_"}, "flux": {"lora_te1_"},
                       "sd3": {"lora_te1_", "lora_te2_"}}  # fmt: skip
# the files diffusers' own load_lora_weights reads, per format (ComfyUI's keys: FLUX's reader converts them)
DIFFUSERS_READS = {"diffusers": {"sd", "sdxl", "sd3", "flux"}, "kohya": {"sd", "sdxl", "flux"}, "comfyui": {"flux"}}
_NO_COMFYUI_UNET = "diffusers reads no ComfyUI keys of a UNet"
NO_LOADER = {
    "pixart": "PixArtSigmaPipeline has no load_lora_weights in diffusers 0.42: peft is its loader",
    "sd3": "diffusers 0.42's SD3 loader reads no kohya / ComfyUI keys (the names are checked against its single-file "
    "converter in tests/formats/test_checkpoint_names.py)",
    "sd": _NO_COMFYUI_UNET,
    "sdxl": _NO_COMFYUI_UNET,
}


def _family(ref: str) -> str:
    return next(name for name, model in MODELS.items() if model == ref)


def _formats(ref: str) -> list[str]:
    """The formats a family's LoRA is written in (kohya: the families kohya sd-scripts trains)."""
    return [f for f in WRITABLE if f != "kohya" or _family(ref) in KOHYA_TEXT_PREFIXES]


def _assert_same(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=ATOL, rtol=0)


def _without_single_blocks(ref: str):
    """A FLUX LoRA on every double-block name and CLIP, none on the single blocks: diffusers 0.42 splits a kohya /
    ComfyUI single_blocks.N.linear1 by FLUX.1's real widths (3072 x 3 + 12288), which a tiny model does not have;
    quantune's own reader reads every module (test_every_format_round_trips)."""
    pipe = load_pipeline(ref)
    family = family_of(pipe)
    targets = [*family.denoiser_targets, "norm1.linear", "norm1_context.linear"]  # every double-block name
    add_lora(family.denoiser_of(pipe), LoraConfig(r=4, alpha=2.0, targets=targets, seed=0))
    randomize_lora(family.denoiser_of(pipe), 0)
    add_lora(pipe.text_encoder, LoraConfig(r=2, alpha=3.0, targets=list(family.text_encoder_targets)))
    randomize_lora(pipe.text_encoder, 1)
    weights = {k: m for k, m in get_lora_weights(pipe).items() if ".single_transformer_" not in k}
    pipe = load_pipeline(ref)
    apply_lora(pipe, weights)
    return pipe, weights


@pytest.mark.parametrize("fmt", sorted(DIFFUSERS_READS))
def test_diffusers_loader_reproduces_quantune(family_lora_pipe, family_ref, fmt, tmp_path):
    if _family(family_ref) not in DIFFUSERS_READS[fmt]:
        pytest.skip(NO_LOADER[_family(family_ref)])
    weights = get_lora_weights(family_lora_pipe)
    if fmt != "diffusers" and _family(family_ref) == "flux":
        family_lora_pipe, weights = _without_single_blocks(family_ref)
    reference = family_outputs(family_lora_pipe)
    assert (reference[1] - family_outputs(load_pipeline(family_ref))[1]).abs().max() > 1e-2  # the LoRA matters
    path = write_lora(weights, tmp_path / "lora.safetensors", fmt, pipe=family_lora_pipe)
    fresh = load_pipeline(family_ref)
    fresh.load_lora_weights(str(path))
    _assert_same(family_outputs(fresh), reference)


def test_kohya_names_per_family(family_lora_pipe, tmp_path):
    name = family_of(family_lora_pipe).name
    if name not in KOHYA_TEXT_PREFIXES:  # refused by name, never written with names kohya's tools do not read
        with pytest.raises(QuantuneError, match="kohya sd-scripts has no PixArt LoRA names"):
            write_lora(get_lora_weights(family_lora_pipe), tmp_path / "k.safetensors", "kohya", pipe=family_lora_pipe)
        return
    path = write_lora(get_lora_weights(family_lora_pipe), tmp_path / "k.safetensors", "kohya", pipe=family_lora_pipe)
    with safe_open(str(path), "pt") as f:
        prefixes = {k.split("text_model")[0] for k in f.keys() if not k.startswith("lora_unet_")}
    assert prefixes == KOHYA_TEXT_PREFIXES[family_of(family_lora_pipe).name]


def test_peft_loads_quantune_export(family_lora_pipe, family_ref, tmp_path):
    reference = family_outputs(family_lora_pipe)
    write_lora(get_lora_weights(family_lora_pipe), tmp_path / "peft", "peft")
    fresh = load_pipeline(family_ref)
    family = family_of(fresh)
    names = [family.denoiser, *family.lora_text_encoders_of(fresh)]
    wrapped = {n: peft.PeftModel.from_pretrained(getattr(fresh, n), tmp_path / "peft" / n) for n in names}
    _assert_same(family_outputs(fresh, wrapped), reference)


def test_every_format_round_trips(family_lora_pipe, family_ref, tmp_path):
    weights = get_lora_weights(family_lora_pipe)
    for fmt in _formats(family_ref):
        path = write_lora(
            weights, tmp_path / (fmt if fmt == "peft" else f"{fmt}.safetensors"), fmt, pipe=family_lora_pipe
        )
        back, read_fmt, _ = read_lora(path, load_pipeline(family_ref))
        assert read_fmt == fmt and set(back) == set(weights), fmt
        for key, module in weights.items():
            torch.testing.assert_close(back[key].delta(), module.delta(), atol=1e-6, rtol=0)


def test_sdxl_kohya_names_are_stabilitys_at_real_size():
    """Every Linear / Conv2d of a full-size SDXL UNet (built on the meta device) maps to Stability's name and
    back; anchors as in kohya's SDXL LoRA files."""
    from diffusers import UNet2DConditionModel

    from quantune.formats.unet_names import UNetLayout, diffusers_to_ldm_path, ldm_to_diffusers_path

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, cross_attention_dim=2048,
        )  # fmt: skip
    layout = UNetLayout.of(unet)
    assert layout == UNetLayout(2, (True, True, False))  # the default: the standard SDXL UNet
    names = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    for name in names:
        assert ldm_to_diffusers_path(diffusers_to_ldm_path(name, layout), 2, sdxl=True) == name
    tb = "transformer_blocks"
    anchors = {
        f"down_blocks.1.attentions.0.{tb}.0.attn1.to_k": f"input_blocks.4.1.{tb}.0.attn1.to_k",
        f"down_blocks.2.attentions.1.{tb}.9.ff.net.2": f"input_blocks.8.1.{tb}.9.ff.net.2",
        "mid_block.attentions.0.proj_in": "middle_block.1.proj_in",
        f"up_blocks.0.attentions.2.{tb}.0.attn2.to_v": f"output_blocks.2.1.{tb}.0.attn2.to_v",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.2.resnets.0.conv1": "output_blocks.6.0.in_layers.2",
        "add_embedding.linear_1": "label_emb.0.0",
    }
    for diffusers_name, stability_name in anchors.items():
        assert diffusers_to_ldm_path(diffusers_name, layout) == stability_name
