"""The latent-diffusion training objective (Ho et al. 2020, DDPM; Rombach et al. 2022, LDM), with the options
users of the peers expect.

    z0 = s_vae * E(x),  t ~ U{0..T-1},  eps ~ N(0, I) (+ noise_offset * N(0, 1) per channel, Guttenberg 2023),
    z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps,
    L_i = w_i * || eps_theta(z_t, t, c) - target ||^2,  target = eps (epsilon prediction) or
          v = sqrt(abar_t) eps - sqrt(1 - abar_t) z0 (v prediction), as the scheduler's prediction_type says;
    min-SNR weighting (Hang et al. 2023, arXiv:2303.09556): w_i = min(SNR_t, gamma) / SNR_t for epsilon,
    min(SNR_t, gamma) / (SNR_t + 1) for v; otherwise w_i = 1.
The conditioning c (text states, SDXL's added conditions) is the model family's (quantune.families).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from quantune.families import family_of, using_modules


def training_scheduler(pipe):
    """The DDPM noise schedule of the pipeline's scheduler config (as diffusers' training scripts build it): the
    same betas whatever sampler the pipeline ships (DDIM, Euler), and stateless, so sampling in between (validation
    grids) cannot change it."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def encode_prompts(pipe, captions: list[str]) -> torch.Tensor:
    """Captions -> the denoiser's encoder hidden states [B, L, D] (the family's conditioning, its text states)."""
    family = family_of(pipe)
    return family.condition(pipe, captions, (family.default_size(pipe),) * 2)["encoder_hidden_states"]


@torch.no_grad()
def latent_params(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE posterior's parameters [B, 2C, h, w] (mean and log-variance), what a latent cache stores."""
    vae = pipe.vae
    return vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.parameters


def sample_latents(pipe, params: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """z0 = s_vae * (mean + std * N(0, I)) from posterior parameters [B, 2C, h, w] -> [B, C, h, w]."""
    mean, logvar = params.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    noise = torch.randn(mean.shape, generator=generator).to(mean.device)
    return (mean + std * noise) * pipe.vae.config.scaling_factor


def denoising_loss(
    pipe,
    latents: torch.Tensor,
    captions: list[str],
    generator: torch.Generator,
    denoiser=None,
    text_encoders: dict | None = None,
    min_snr_gamma: float | None = None,
    noise_offset: float = 0.0,
    scheduler=None,
) -> torch.Tensor:
    """Per-sample losses [B] of the denoiser (or its wrapped `denoiser`; `text_encoders`: wrapped text encoders
    by component name) on clean latents [B, C, h, w] with captions; `scheduler`: the training noise schedule."""
    family = family_of(pipe)
    denoiser = denoiser or family.denoiser_of(pipe)
    scheduler = scheduler or training_scheduler(pipe)
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=generator).to(latents.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    size = tuple(int(n) * pipe.vae_scale_factor for n in latents.shape[-2:])
    with using_modules(pipe, text_encoders):
        cond = family.condition(pipe, captions, size)
    pred = family.predict(pipe, denoiser, noisy, t, cond)
    epsilon = scheduler.config.prediction_type == "epsilon"
    target = noise if epsilon else scheduler.get_velocity(latents, noise, t)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # [B]
    if min_snr_gamma is not None:
        snr = compute_snr(scheduler, t)
        clipped = torch.clamp(snr, max=min_snr_gamma)
        per_sample = per_sample * (clipped / snr if epsilon else clipped / (snr + 1))
    return per_sample
