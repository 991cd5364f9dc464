"""Shared fixtures: fresh zoo:tiny pipelines (tests mutate them) and a pipeline carrying a non-trivial LoRA."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture
def tiny():
    from quantune.models import build_tiny

    return build_tiny()


def randomize_lora(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Give every LoRA up (B) factor non-zero values so the adapter changes outputs."""
    from quantune.lora import lora_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_up.weight.normal_(0.0, std, generator=g)


@pytest.fixture
def lora_pipe(tiny):
    """zoo:tiny with a LoRA on UNet attention + proj_in + resnet conv1 (3x3) and on the CLIP attention."""
    from quantune.lora import TEXT_ENCODER_TARGETS, LoraConfig, add_lora

    unet_cfg = LoraConfig(
        r=4,
        alpha=2.0,
        targets=r".*(to_q|to_k|to_v|to_out\.0|proj_in|conv1)",
        rank_pattern={"attn2.to_k": 2},
        alpha_pattern={"to_v": 5.0},
        seed=0,
    )
    add_lora(tiny.unet, unet_cfg)
    add_lora(tiny.text_encoder, LoraConfig(r=2, alpha=3.0, targets=TEXT_ENCODER_TARGETS, seed=1))
    randomize_lora(tiny.unet, 0)
    randomize_lora(tiny.text_encoder, 1)
    return tiny


@pytest.fixture
def lora_file(lora_pipe, tmp_path):
    """lora_pipe's LoRA as a quantune file in tmp_path."""
    from quantune.formats import write_lora
    from quantune.lora import get_lora_weights

    return write_lora(get_lora_weights(lora_pipe), tmp_path / "lora.safetensors", "quantune")


def unet_inputs(pipe, prompt: str = "red apple"):
    """A fixed latent, timestep and token ids for comparing UNet / text-encoder outputs."""
    g = torch.Generator().manual_seed(123)
    x = torch.randn(2, 4, 32, 32, generator=g)  # [B, C, H, W] latents
    t = torch.tensor([10, 700])
    ids = pipe.tokenizer([prompt, "cat face"], padding="max_length", return_tensors="pt").input_ids  # [B, 77]
    return x, t, ids


@torch.no_grad()
def pipe_outputs(pipe, text_encoder=None, unet=None, prompt: str = "red apple"):
    """(text embeddings, UNet noise prediction) of a pipeline (or of the given wrapped modules)."""
    x, t, ids = unet_inputs(pipe, prompt)
    te = (text_encoder or pipe.text_encoder)(input_ids=ids)[0]
    out = (unet or pipe.unet)(x, t, te).sample
    return te, out
