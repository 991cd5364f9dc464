"""Validation grids during and after training: the validation prompts x K images, the seeds fixed across steps."""

from __future__ import annotations

from pathlib import Path

import torch

from quantune.families import family_of
from quantune.io import make_grid, save_png


@torch.no_grad()
def save_validation_grid(pipe, cfg, path: Path) -> Path:
    """One row per validation prompt, cfg.log.validation_images columns, seeds 0..K-1; written atomically."""
    rows = []
    k = cfg.log.validation_images
    for prompt in cfg.log.validation_prompts:
        generators = [torch.Generator().manual_seed(j) for j in range(k)]
        images = pipe(
            [prompt] * k,
            num_inference_steps=cfg.log.validation_steps,
            height=cfg.data.resolution,
            width=cfg.data.resolution,
            generator=generators,
            **family_of(pipe).guidance_kwargs(pipe, cfg.log.validation_guidance, k),
            **family_of(pipe).call_kwargs(pipe),
        ).images
        rows.append(images)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(make_grid(rows), path)
    return path
