"""The rectified-flow (flow-matching) objective of SD3 and FLUX (Esser et al. 2024, "Scaling Rectified Flow
Transformers for High-Resolution Image Synthesis", arXiv:2403.03206; Liu et al. 2022, rectified flow):

    x_t = (1 - sigma) x_0 + sigma eps,   target v = eps - x_0,   L_i = w(sigma_i) || v_theta(x_t, t, c) - v ||^2,
    u ~ density (uniform, logit-normal(m, s) or mode(scale); section 3.1), t = timesteps[floor(u T)],
    sigma = the scheduler's sigma at t (a static shift applied, SD3's: sigma = shift s / (1 + (shift - 1) s);
            with dynamic shifting, FLUX's, the training table is unshifted, as diffusers' FLUX script trains),
    w = 1, sigma^-2 (sigma_sqrt) or the cosmap weight, as `train.weighting_scheme` says.
The loss is on the velocity itself (diffusers' SD3 script with --precondition_outputs 0; its default 1 compares
x_0 estimates instead, a sigma^2 weighting). `train.noise_offset` still perturbs eps (diffusers' flow scripts have
no offset); `train.min_snr_gamma` does not apply (a warning says so).

The density and the weights are diffusers' own (`training_utils.compute_density_for_timestep_sampling`,
`compute_loss_weighting_for_sd3`, the functions its SD3 / FLUX DreamBooth scripts call); only the indexing of
the scheduler's table is written here. The denoiser gets t on the scheduler's 0..1000 scale (the family's
`predict` rescales it where the model wants sigma, as FLUX does).
"""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")


def is_flow_matching(scheduler) -> bool:
    """True for a flow-matching scheduler (FlowMatchEulerDiscreteScheduler and its kin)."""
    return type(scheduler).__name__.startswith("FlowMatch")


def flow_matching(scheduler, latents: torch.Tensor, noise: torch.Tensor, generator: torch.Generator, options):
    """(x_t, t, target, per-sample weight [B]) for clean latents x_0 [B, C, h, w] and noise eps."""
    b = latents.shape[0]
    u = compute_density_for_timestep_sampling(
        options.weighting_scheme, b, options.logit_mean, options.logit_std, options.mode_scale, generator=generator
    )
    n = scheduler.config.num_train_timesteps
    index = (u * n).long().clamp(0, len(scheduler.timesteps) - 1)
    t = scheduler.timesteps[index].to(latents.device)
    sigma = scheduler.sigmas[index].to(latents.device, torch.float32)
    s = sigma.view(b, *([1] * (latents.dim() - 1)))
    noisy = (1.0 - s) * latents + s * noise
    weight = compute_loss_weighting_for_sd3(options.weighting_scheme, sigma).float()
    return noisy, t, noise - latents, weight
