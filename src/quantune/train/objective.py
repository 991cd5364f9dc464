"""The latent-diffusion training objective (Ho et al. 2020, DDPM; Rombach et al. 2022, LDM).

z0 = s_vae * E(x),  t ~ U{0..T-1},  eps ~ N(0, I),  z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps
L = || eps_theta(z_t, t, c) - target ||^2,  target = eps (epsilon prediction) or v = sqrt(abar_t) eps -
sqrt(1 - abar_t) z0 (v prediction), as the scheduler's prediction_type says.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def encode_prompts(pipe, captions: list[str]) -> torch.Tensor:
    """Token ids [B, 77] -> CLIP hidden states [B, 77, D] (with the gradient, for text-encoder LoRA)."""
    ids = pipe.tokenizer(
        captions,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(pipe.text_encoder.device)
    return pipe.text_encoder(ids)[0]


def denoising_loss(pipe, pixels: torch.Tensor, captions: list[str], generator: torch.Generator) -> torch.Tensor:
    """The mean-squared denoising loss of `pipe.unet` on images [B, 3, H, W] in [-1, 1] with their captions."""
    scheduler = pipe.scheduler
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.sample(generator) * pipe.vae.config.scaling_factor  # [B,4,h,w]
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    noisy = scheduler.add_noise(latents, noise, t)
    cond = encode_prompts(pipe, captions)
    pred = pipe.unet(noisy, t, cond).sample
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
    return F.mse_loss(pred.float(), target.float())
