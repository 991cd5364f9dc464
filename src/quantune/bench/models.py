"""The models the benchmark tables run on, and random UNet inputs of the right shapes.

- `zoo:emoji` (and any zoo / folder reference): the real pipeline.
- `sd15`: the Stable Diffusion 1.5 UNet architecture, randomly initialised (no download: speed and memory are
  real, quality is not), inside zoo:tiny's pipeline (its VAE and text encoder are not used by UNet-only rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # LoRA targets of diffusers' train_text_to_image_lora.py


def sd15_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
    )


@dataclass
class BenchModel:
    pipe: object
    name: str
    latent_factor: int  # image px per latent px
    seq: int  # text tokens

    @property
    def unet(self):
        return self.pipe.unet

    def inputs(self, batch: int, res: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Seeded (latents, timesteps, text states) for one UNet call at `res` px."""
        g = torch.Generator().manual_seed(seed)
        side = res // self.latent_factor
        x = torch.randn(batch, self.unet.config.in_channels, side, side, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        ehs = torch.randn(batch, self.seq, self.unet.config.cross_attention_dim, generator=g)
        return x, t, ehs


def build(name: str) -> BenchModel:
    from quantune.models import build_tiny, load_pipeline

    torch.manual_seed(0)
    if name == "sd15":
        pipe = build_tiny()
        pipe.unet = sd15_unet()
        return BenchModel(pipe, name, 8, 77)
    pipe = load_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    return BenchModel(pipe, name, pipe.vae_scale_factor, pipe.tokenizer.model_max_length)
