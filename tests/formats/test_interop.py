"""Interop with the real loaders: diffusers' load_lora_weights (diffusers and kohya files) and peft's
PeftModel.from_pretrained must give the same UNet and text-encoder outputs as quantune's own wrapped model."""

from __future__ import annotations

import json

import peft
import torch
from safetensors import safe_open

from quantune.formats import read_lora, write_lora
from quantune.lora import get_lora_weights
from quantune.models import build_tiny
from tests.conftest import pipe_outputs

ATOL = 1e-5  # fp32; outputs are O(1)


def _assert_same(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=ATOL, rtol=0)


def test_diffusers_loader_reads_quantune_export(lora_pipe, tmp_path):
    reference = pipe_outputs(lora_pipe)
    path = write_lora(get_lora_weights(lora_pipe), tmp_path / "lora.safetensors", "diffusers")
    fresh = build_tiny()
    fresh.load_lora_weights(str(path))
    _assert_same(pipe_outputs(fresh), reference)
    # and the folder form, as diffusers' own save_lora_weights writes it
    folder = write_lora(get_lora_weights(lora_pipe), tmp_path / "dir", "diffusers")
    assert folder.name == "pytorch_lora_weights.safetensors"
    again = build_tiny()
    again.load_lora_weights(str(tmp_path / "dir"))
    _assert_same(pipe_outputs(again), reference)


def test_quantune_reads_diffusers_own_save(lora_pipe, tmp_path):
    """A file written by diffusers itself (peft-backed save_lora_weights) reads back to the same outputs."""
    reference = pipe_outputs(lora_pipe)
    fresh = build_tiny()
    fresh.load_lora_weights(str(write_lora(get_lora_weights(lora_pipe), tmp_path / "a.safetensors", "diffusers")))
    from peft.utils import get_peft_model_state_dict

    fresh.save_lora_weights(
        tmp_path / "own",
        unet_lora_layers=get_peft_model_state_dict(fresh.unet, adapter_name="default_0"),
        text_encoder_lora_layers=get_peft_model_state_dict(fresh.text_encoder, adapter_name="default_0"),
        unet_lora_adapter_metadata=fresh.unet.peft_config["default_0"].to_dict(),
        text_encoder_lora_adapter_metadata=fresh.text_encoder.peft_config["default_0"].to_dict(),
    )
    weights, fmt, _ = read_lora(tmp_path / "own", build_tiny())
    assert fmt == "diffusers"
    mine = build_tiny()
    from quantune.lora import apply_lora

    apply_lora(mine, weights)
    _assert_same(pipe_outputs(mine), reference)


def test_peft_loads_quantune_export(lora_pipe, tmp_path):
    reference = pipe_outputs(lora_pipe)
    write_lora(get_lora_weights(lora_pipe), tmp_path / "peft", "peft")
    cfg = json.loads((tmp_path / "peft" / "unet" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 2.0
    fresh = build_tiny()
    unet = peft.PeftModel.from_pretrained(fresh.unet, tmp_path / "peft" / "unet")
    te = peft.PeftModel.from_pretrained(fresh.text_encoder, tmp_path / "peft" / "text_encoder")
    _assert_same(pipe_outputs(fresh, text_encoder=te, unet=unet), reference)


def test_kohya_export_keeps_alpha_and_loads_in_diffusers(lora_pipe, tmp_path):
    reference = pipe_outputs(lora_pipe)
    path = write_lora(get_lora_weights(lora_pipe), tmp_path / "k.safetensors", "kohya")
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
        assert float(f.get_tensor(f"{q}.alpha")) == 2.0  # alpha 2, rank 4: not written as alpha = r
        assert f.get_tensor(f"{q}.lora_down.weight").shape[0] == 4
        assert float(f.get_tensor("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha")) == 3.0
        assert f.metadata()["ss_network_module"] == "networks.lora"
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    fresh = build_tiny()
    fresh.load_lora_weights(str(path))
    _assert_same(pipe_outputs(fresh), reference)


def test_every_format_round_trips(lora_pipe, tmp_path):
    weights = get_lora_weights(lora_pipe)
    for fmt in ("quantune", "diffusers", "peft", "kohya"):
        out = write_lora(weights, tmp_path / (fmt if fmt == "peft" else f"{fmt}.safetensors"), fmt)
        back, detected, _ = read_lora(out, build_tiny())
        assert detected == fmt and set(back) == set(weights), fmt
        for key, mod in weights.items():
            torch.testing.assert_close(back[key].delta(), mod.delta(), atol=1e-6, rtol=0)
        if fmt != "kohya":  # kohya folds mixed alphas into B (see formats/kohya.py); others keep the factors
            assert all(back[k].alpha == m.alpha and torch.equal(back[k].up, m.up) for k, m in weights.items())


def test_kohya_names_restore_without_a_model(lora_pipe, tmp_path):
    weights = get_lora_weights(lora_pipe)
    out = write_lora(weights, tmp_path / "k.safetensors", "kohya")
    back, _, _ = read_lora(out)  # vocabulary-based, no model given
    unet_keys = {k for k in weights if k.startswith("unet.")}
    assert {k for k in back if k.startswith("unet.")} == unet_keys
    te = {k.replace("text_encoder.text_model.", "text_encoder.") for k in back if k.startswith("text_encoder.")}
    assert te == set(weights) - unet_keys  # kohya files spell CLIP paths with text_model., as transformers 4 did
