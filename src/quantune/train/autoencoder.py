"""Task `autoencoder`: train the pipeline's AutoencoderKL on the training images (the first half of a from-scratch
recipe such as zoo:emoji's; Kingma & Welling 2014, Rombach et al. 2022 without the GAN and LPIPS terms).

    L = |x - D(z)|_1 + ||x - D(z)||^2 + kl_weight * KL(q(z|x) || N(0, I)),  z ~ q(z|x) = E(x)

At the end the VAE's `scaling_factor` is set to 1 / std of the latents over the data (SD's 0.18215 was found the
same way), so the UNet trained next sees unit-variance latents; the whole pipeline is exported.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from quantune.io import DIFFUSERS_FOLDER, atomic_dir, write_json
from quantune.models import load_pipeline
from quantune.train.data import Batcher, build_datasets, stream_indices
from quantune.train.trainer import TrainResult, _peak_memory_mb, _step_seed

logger = logging.getLogger(__name__)


def start_autoencoder(cfg) -> tuple:
    """Load the pipeline and the data, then write config.json: (pipe, data). Run inside the trainer's claim of
    output_dir, so a failed start leaves nothing."""
    out = Path(cfg.output_dir)
    pipe = load_pipeline(cfg.model.pretrained, backend="torch")
    data, _ = build_datasets(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(cfg.to_dict(), out / "config.json")
    return pipe, data


def train_autoencoder(cfg, started: tuple):
    """Train the VAE of `started` = start_autoencoder(cfg) and write OUT/pipeline (no checkpoints: no resume)."""
    out = Path(cfg.output_dir)
    pipe, data = started
    vae = pipe.vae
    vae.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(
        vae.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay
    )
    lr_scheduler = get_scheduler(
        cfg.optim.scheduler, optimizer, num_warmup_steps=cfg.optim.warmup_steps, num_training_steps=cfg.train.steps
    )
    batcher = Batcher(data, cfg.data.resolution, cfg.data.random_flip)
    generator = torch.Generator()
    start = time.time()
    with tqdm(range(cfg.train.steps), desc="autoencoder", dynamic_ncols=True) as bar:  # closed before any error
        loss = _steps(cfg, bar, vae, batcher, data, generator, optimizer, lr_scheduler)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        sample = stream_indices(len(data), cfg.train.seed + 1, 0, min(len(data), 512))
        latents = torch.cat(
            [
                vae.encode(batcher.pixels(sample[i : i + 64], generator)).latent_dist.mean
                for i in range(0, len(sample), 64)
            ]
        )
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    logger.info("VAE latent std %.4f -> scaling_factor %.4f", float(latents.std()), vae.config.scaling_factor)
    with atomic_dir(out / "pipeline", DIFFUSERS_FOLDER, overwrite=True) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return TrainResult(
        out,
        cfg.train.steps,
        time.time() - start,
        loss.item(),
        _peak_memory_mb(torch.device("cpu")),
        [out / "pipeline"],
    )


def _steps(cfg, bar, vae, batcher, data, generator, optimizer, lr_scheduler) -> torch.Tensor:
    """The reconstruction steps (L1 + L2 + KL); returns the last loss."""
    loss = torch.tensor(float("nan"))
    for step in bar:
        generator.manual_seed(_step_seed(cfg.train.seed, step, 0))
        idx = stream_indices(len(data), cfg.train.seed, step * cfg.train.batch_size, cfg.train.batch_size)
        x = batcher.pixels(idx, generator)  # [B, 3, H, W] in [-1, 1]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + cfg.train.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.optim.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return loss
