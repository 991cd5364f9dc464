"""Fixtures parametrized over the model families: a new family is covered by adding its tiny zoo model to MODELS."""

from __future__ import annotations

import pytest
import torch

from quantune.families import family_of
from quantune.lora import LoraConfig, add_lora
from quantune.models import load_pipeline
from tests.conftest import randomize_lora

MODELS = {  # family name -> its tiny zoo model
    "sd": "zoo:tiny",
    "sdxl": "zoo:tiny-xl",
    "pixart": "zoo:tiny-pixart",
    "sd3": "zoo:tiny-sd3",
    "flux": "zoo:tiny-flux",
}


@pytest.fixture(params=sorted(MODELS))
def family_ref(request) -> str:
    return MODELS[request.param]


def add_random_lora(pipe) -> None:
    """A LoRA with non-zero factors on the denoiser (attention + proj_in + 3x3 conv1) and on every text encoder a
    LoRA may adapt (CLIP's; T5 stays frozen)."""
    family = family_of(pipe)
    targets = r".*(to_q|to_k|to_v|to_out\.0|proj_in|conv1)"
    config = LoraConfig(r=4, alpha=2.0, targets=targets, alpha_pattern={"to_v": 5.0}, seed=0)
    add_lora(family.denoiser_of(pipe), config)
    randomize_lora(family.denoiser_of(pipe), 0)
    for i, model in enumerate(family.lora_text_encoders_of(pipe).values()):
        add_lora(model, LoraConfig(r=2, alpha=3.0, targets=list(family.text_encoder_targets), seed=1 + i))
        randomize_lora(model, 1 + i)


@pytest.fixture
def family_lora_pipe(family_ref):
    pipe = load_pipeline(family_ref)
    add_random_lora(pipe)
    return pipe


@torch.no_grad()
def family_outputs(pipe, modules: dict | None = None, prompt: str = "red apple"):
    """(text states, denoiser prediction) on fixed latents and timesteps; `modules`: wrapped components by name."""
    from quantune.families import using_modules

    family = family_of(pipe)
    size = family.default_size(pipe)
    g = torch.Generator().manual_seed(123)
    x = torch.randn(2, 4, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor, generator=g)
    modules = modules or {}
    with using_modules(pipe, {k: v for k, v in modules.items() if k != family.denoiser}):
        cond = family.condition(pipe, [prompt, "cat face"], (size, size))
    denoiser = modules.get(family.denoiser, family.denoiser_of(pipe))
    return cond["encoder_hidden_states"], family.predict(pipe, denoiser, x, torch.tensor([10, 700]), cond)
