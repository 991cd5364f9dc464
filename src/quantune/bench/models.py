"""The models the benchmark tables run on, and random denoiser inputs of the right shapes.

- `zoo:emoji` (and any zoo / folder reference): the real pipeline.
- `sd15`: the Stable Diffusion 1.5 UNet architecture, randomly initialised (no download: speed and memory are
  real, quality is not), inside zoo:tiny's pipeline (its VAE and text encoder are not used by UNet-only rows).
- the diffusion transformers at their real sizes, randomly initialised, inside their tiny zoo pipeline (only the
  transformer runs; its text inputs are random tensors of the real widths and caption lengths, `Family.random_batch`):
  `pixart-sigma` (PixArt-Sigma XL/2 at 512 px, 0.6 B), `sd3.5-medium` (2.5 B: 24 joint blocks, 13 with SD3.5's
  dual attention, qk-norm), `flux-2d4s` (FLUX.1-dev's width, 3072, with 2 of its 19 double and 4 of its 38
  single blocks: 1.3 B of 12 B, which does not fit 24 GB in fp32).
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


def pixart_sigma():
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(  # PixArt-alpha/PixArt-Sigma-XL-2-512-MS's transformer config
        sample_size=64, num_layers=28, attention_head_dim=72, num_attention_heads=16, in_channels=4, out_channels=8,
        patch_size=2, caption_channels=4096, cross_attention_dim=1152, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000, use_additional_conditions=False, interpolation_scale=1,
    )  # fmt: skip


def sd35_medium():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(  # stabilityai/stable-diffusion-3.5-medium's transformer config
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)),
    )  # fmt: skip


def flux_2d4s():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(  # FLUX.1-dev's width and embedders; 2 double + 4 single blocks
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )  # fmt: skip


# name -> (the tiny pipeline it sits in, the real-size denoiser, caption tokens (None: the family's real length))
REAL_SIZE = {
    "sd15": ("zoo:tiny", sd15_unet, 77),
    "pixart-sigma": ("zoo:tiny-pixart", pixart_sigma, None),
    "sd3.5-medium": ("zoo:tiny-sd3", sd35_medium, None),
    "flux-2d4s": ("zoo:tiny-flux", flux_2d4s, None),
}


@dataclass
class BenchModel:
    pipe: object
    name: str
    latent_factor: int  # image px per latent px
    seq: int | None  # text tokens (None: the family's real caption length)

    @property
    def family(self):
        from quantune.families import family_of

        return family_of(self.pipe)

    @property
    def denoiser(self):
        return self.family.denoiser_of(self.pipe)

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def targets(self) -> list[str]:
        """LoRA targets: diffusers' text-to-image script's for UNets, its DreamBooth script's for transformers."""
        return TARGETS if self.family.denoiser == "unet" else list(self.family.denoiser_targets)

    def batch(self, batch: int, res: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Seeded (latents, timesteps, conditioning) for one denoiser call at `res` px, any family."""
        g = torch.Generator().manual_seed(seed)
        return self.family.random_batch(self.denoiser, batch, res // self.latent_factor, g, self.seq)

    def forward(self, model, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The denoiser's prediction, through the family (packing, timestep scale, guidance)."""
        return self.family.predict(self.pipe, model, x, t, cond)


def build(name: str) -> BenchModel:
    from quantune.families import family_of
    from quantune.models import load_pipeline

    torch.manual_seed(0)
    if name in REAL_SIZE:
        ref, make, seq = REAL_SIZE[name]
        pipe = load_pipeline(ref)
        setattr(pipe, family_of(pipe).denoiser, make())
        return BenchModel(pipe, name, 8, seq)
    pipe = load_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    unet = family_of(pipe).denoiser == "unet"  # a transformer: its family's real caption length
    return BenchModel(pipe, name, pipe.vae_scale_factor, pipe.tokenizer.model_max_length if unet else None)
