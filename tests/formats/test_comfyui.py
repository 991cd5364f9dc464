"""ComfyUI's keys: a UNet's are the Stability names kohya's SDXL files use (so the two agree name for name), every
module keeps its alpha, and bad files are refused in one line. The transformers' names are checked against
diffusers' converters (test_checkpoint_names.py) and the round trips per family in tests/families/test_formats.py."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantune.errors import QuantuneError
from quantune.formats import read_lora, write_lora
from quantune.lora import get_lora_weights
from quantune.lora.layers import LoraModule
from quantune.models import load_pipeline
from tests.families.conftest import add_random_lora


def _keys(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_sdxl_unet_names_are_kohyas_and_alphas_are_kept(tmp_path):
    pipe = load_pipeline("zoo:tiny-xl")
    add_random_lora(pipe)
    weights = get_lora_weights(pipe)
    comfy = _keys(write_lora(weights, tmp_path / "c.safetensors", "comfyui", pipe=pipe))
    kohya = _keys(write_lora(weights, tmp_path / "k.safetensors", "kohya", pipe=pipe))
    unet = {k for k in comfy if k.startswith("diffusion_model.")}
    flat = {"lora_unet_" + k[16:].rsplit(".", 1 + k.endswith(".weight"))[0].replace(".", "_") for k in unet}
    assert flat == {k.split(".")[0] for k in kohya if k.startswith("lora_unet_")}
    assert "diffusion_model.input_blocks.3.1.transformer_blocks.0.attn1.to_q.lora_down.weight" in comfy
    assert {k.split(".transformer.")[0] for k in comfy if k.startswith("text_encoders.")} == {
        "text_encoders.clip_l", "text_encoders.clip_g"}  # fmt: skip
    alphas = {float(t) for k, t in comfy.items() if k.endswith(".alpha") and k.startswith("diffusion_model.")}
    assert alphas == {2.0, 5.0}  # each module's own (kohya folds the odd ones into up; ComfyUI needs no folding)


def _write(tmp_path, sd: dict) -> str:
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    return str(path)


def test_bad_comfyui_files_are_one_line(tmp_path):
    key = "diffusion_model.input_blocks.1.1.proj_in"
    cases = {
        "several adapter types": {f"{key}.lora_down.weight": torch.zeros(2, 8), f"{key}.hada_w1_a": torch.zeros(2, 2)},
        "no lora_up": {f"{key}.lora_down.weight": torch.zeros(2, 8)},
        "read it with --model of a FLUX.1 pipeline": {
            "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight": torch.zeros(2, 8),
            "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight": torch.zeros(24, 2),
        },
    }
    for message, sd in cases.items():
        with pytest.raises(QuantuneError, match=message) as e:
            read_lora(_write(tmp_path, sd))
        assert "\n" not in str(e.value)


def test_a_transformer_lora_needs_its_model_to_be_written(tmp_path):
    pipe = load_pipeline("zoo:tiny-sd3")
    add_random_lora(pipe)
    weights = get_lora_weights(pipe)
    with pytest.raises(QuantuneError, match="comfyui names need its model: pass --model"):
        write_lora(weights, tmp_path / "c.safetensors", "comfyui")
    assert not (tmp_path / "c.safetensors").exists()
    stray = {**weights, "transformer.norm_out.linear": next(iter(weights.values()))}
    with pytest.raises(QuantuneError, match="has no comfyui .SD3. name quantune writes"):
        write_lora(stray, tmp_path / "c.safetensors", "comfyui", pipe=pipe)


def test_transformer_files_read_without_the_model_name_their_architecture(tmp_path):
    """Whatever module sorts first (SD3's context_embedder is in no block), the file is recognised by its blocks."""
    pipe = load_pipeline("zoo:tiny-sd3")
    add_random_lora(pipe)
    layer = pipe.transformer.context_embedder
    extra = {
        "transformer.context_embedder": LoraModule(
            torch.ones(2, layer.in_features), torch.ones(layer.out_features, 2), 2.0
        )
    }
    weights = {**get_lora_weights(pipe), **extra}
    for fmt in ("kohya", "comfyui"):
        path = write_lora(weights, tmp_path / f"{fmt}.safetensors", fmt, pipe=pipe)
        with pytest.raises(QuantuneError, match="is a SD3 LoRA: read it with --model of a SD3 pipeline") as e:
            read_lora(path)
        assert "\n" not in str(e.value)
    alone = {"lora_unet_context_embedder.lora_down.weight": torch.zeros(2, 8),
             "lora_unet_context_embedder.lora_up.weight": torch.zeros(8, 2)}  # fmt: skip
    with pytest.raises(QuantuneError, match="no UNet module quantune knows"):
        read_lora(_write(tmp_path, alone))


def test_flux_schnell_has_no_guidance_names_and_its_own_modelspec(tmp_path):
    from diffusers import FluxTransformer2DModel

    from quantune.formats.checkpoint_names import architecture_of
    from quantune.formats.kohya import to_kohya

    pipe = load_pipeline("zoo:tiny-flux")
    config = dict(pipe.transformer.config, guidance_embeds=False)
    schnell = FluxTransformer2DModel.from_config(config)
    table = architecture_of(schnell).table(schnell)
    assert "guidance_in.in_layer" not in table and "guidance_in.in_layer" in architecture_of(pipe.transformer).table(
        pipe.transformer
    )
    layer = schnell.get_submodule("transformer_blocks.0.attn.to_out.0")
    module = LoraModule(torch.ones(2, layer.in_features), torch.ones(layer.out_features, 2), 2.0)
    lora = {"transformer.transformer_blocks.0.attn.to_out.0": module}
    assert to_kohya(lora, schnell)[1]["modelspec.architecture"] == "flux-1-schnell/lora"
    guided = {"transformer.time_text_embed.guidance_embedder.linear_1": LoraModule(torch.ones(2, 256), torch.ones(
        pipe.transformer.time_text_embed.guidance_embedder.linear_1.out_features, 2), 2.0)}  # fmt: skip
    with pytest.raises(QuantuneError, match="has no kohya .FLUX.1. name quantune writes"):
        to_kohya(guided, schnell)  # a dev LoRA's guidance module: schnell has none
