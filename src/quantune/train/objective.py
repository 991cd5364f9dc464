"""The latent-diffusion training objective (Ho et al. 2020, DDPM; Rombach et al. 2022, LDM), with the options
users of the peers expect.

    z0 = s_vae * (E(x) - shift_vae),  t ~ U{0..T-1},
    eps ~ N(0, I) (+ noise_offset * N(0, 1) per channel, Guttenberg 2023),
    z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps,
    L_i = w_i * || eps_theta(z_t, t, c) - target ||^2,  target = eps (epsilon prediction) or
          v = sqrt(abar_t) eps - sqrt(1 - abar_t) z0 (v prediction), as the scheduler's prediction_type says;
    min-SNR weighting (Hang et al. 2023, arXiv:2303.09556): w_i = min(SNR_t, gamma) / SNR_t for epsilon,
    min(SNR_t, gamma) / (SNR_t + 1) for v; otherwise w_i = 1.
The conditioning c (text states, SDXL's added conditions) is the model family's (quantune.families). Pipelines
whose scheduler is a flow-matching one (SD3, FLUX) train with train/flow_matching.py's objective instead.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from quantune.errors import QuantuneError
from quantune.families import family_of, using_modules
from quantune.train.flow_matching import flow_matching, is_flow_matching

logger = logging.getLogger(__name__)
_WARNED: list[bool] = []  # the min-SNR warning, once per process


def training_scheduler(pipe):
    """The training noise schedule from the pipeline's scheduler config (as diffusers' training scripts build it):
    DDPM's betas whatever sampler a UNet pipeline ships (DDIM, Euler); a flow-matching pipeline's own
    FlowMatchEulerDiscreteScheduler (its shift in its sigmas). A fresh copy, so sampling in between (validation
    grids) cannot change it."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    family = family_of(pipe)
    flow = family.objective == "flow"
    if flow != is_flow_matching(pipe.scheduler):
        wanted = "a flow-matching scheduler (FlowMatchEulerDiscreteScheduler)" if flow else "a DDPM-family scheduler"
        raise QuantuneError(
            f"{family.name} trains with the {family.objective} objective, but the pipeline's scheduler is "
            f"{type(pipe.scheduler).__name__}: give the model {wanted}, as it ships"
        )
    if flow:
        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
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
    shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0  # SD3 / FLUX VAEs: z = (x - shift) * scale
    return (mean + std * noise - shift) * pipe.vae.config.scaling_factor


def denoising_loss(
    pipe,
    latents: torch.Tensor,
    captions: list[str],
    generator: torch.Generator,
    denoiser=None,
    text_encoders: dict | None = None,
    options=None,
    scheduler=None,
    conditioner=None,
) -> torch.Tensor:
    """Per-sample losses [B] of the denoiser (or its wrapped `denoiser`; `text_encoders`: wrapped text encoders
    by component name) on clean latents [B, C, h, w] with captions; `options`: the config's [train] section (min-SNR,
    noise offset, flow matching's timestep density and weighting, FLUX's guidance); `scheduler`: the training noise
    schedule, whose kind picks the objective (DDPM's here, or train/flow_matching.py's); `conditioner`: captions ->
    conditioning (a cache, train/text_cache.py) in place of the family's text encoders."""
    from quantune.train.config import TrainSection  # deferred: config imports this module's users

    options = options if options is not None else TrainSection()
    family = family_of(pipe)
    denoiser = denoiser or family.denoiser_of(pipe)
    scheduler = scheduler or training_scheduler(pipe)
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    if options.noise_offset:
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator).to(latents.device)
        noise = noise + options.noise_offset * offset
    if family.objective == "flow" and options.min_snr_gamma is not None and not _WARNED:
        _WARNED.append(True)
        logger.warning("train.min_snr_gamma is DDPM's weighting: flow matching ignores it (train.weighting_scheme)")
    noisy, t, target, weight = OBJECTIVES[family.objective](scheduler, latents, noise, generator, options)
    size = tuple(int(n) * pipe.vae_scale_factor for n in latents.shape[-2:])
    if conditioner is not None:
        cond = conditioner(captions)
    else:
        with using_modules(pipe, text_encoders):
            cond = family.condition(pipe, captions, size)
    pred = family.predict(pipe, denoiser, noisy, t, cond, guidance=options.guidance)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # [B]
    return per_sample * weight


def ddpm_objective(scheduler, latents, noise, generator, options):
    """DDPM / LDM: t ~ U{0..T-1}, z_t = scheduler.add_noise, target eps or v, min-SNR weights (module docstring)."""
    b = latents.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    epsilon = scheduler.config.prediction_type == "epsilon"
    target = noise if epsilon else scheduler.get_velocity(latents, noise, t)
    weight = torch.ones(b, device=latents.device)
    if options.min_snr_gamma is not None:
        snr = compute_snr(scheduler, t)
        clipped = torch.clamp(snr, max=options.min_snr_gamma)
        weight = clipped / snr if epsilon else clipped / (snr + 1)
    return noisy, t, target, weight


OBJECTIVES = {"ddpm": ddpm_objective, "flow": flow_matching}  # Family.objective -> (x_t, t, target, weight)
