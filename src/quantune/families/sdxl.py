"""Stable Diffusion XL (Podell et al. 2023, arXiv:2307.01952): `StableDiffusionXLPipeline`, a
`UNet2DConditionModel` with `addition_embed_type = "text_time"`. Conditioning: the penultimate hidden states of
two CLIP text encoders concatenated (text_encoder: CLIP ViT-L, text_encoder_2: OpenCLIP bigG with projection),
plus added conditions `text_embeds` (text_encoder_2's pooled, projected output) and `time_ids` (original size,
crop top-left, target size: 6 numbers per image, micro-conditioning section 2.2). kohya names the encoders'
LoRA modules `lora_te1_` and `lora_te2_`.

zoo:tiny-xl: the sizes of diffusers' own SDXL pipeline tests (UNet channels 32/64, linear projections,
transformer depth (1, 2), `addition_time_embed_dim` 8, two CLIP encoders of width 32, the second with a 32-wide
projection), one layer per block and 8 norm groups, the tiny VAE, the shipped tokenizer for both encoders and an
Euler scheduler, as SDXL ships. Deterministic (seeded per component), built in about a second.
"""

from __future__ import annotations

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

from quantune.assets import MAX_TOKENS, load_tokenizer
from quantune.families.base import Conditioning
from quantune.families.sd import StableDiffusion, clip_text_encoder, tiny_vae


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
    denoiser_classes = ("UNet2DConditionModel",)
    text_encoders = ("text_encoder", "text_encoder_2")

    def extra_match(self, pipe) -> bool:
        return getattr(self.denoiser_of(pipe).config, "addition_embed_type", None) == "text_time"

    def condition(self, pipe, captions: list[str], size: tuple[int, int]) -> Conditioning:
        device = self.denoiser_of(pipe).device
        states, _, pooled, _ = pipe.encode_prompt(captions, device=device, do_classifier_free_guidance=False)
        # original size, crop top-left, target size: the images are resized and centre-cropped to `size`
        time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=states.dtype, device=device).repeat(len(captions), 1)
        return {"encoder_hidden_states": states, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    def random_condition(self, model, batch, generator, tokens=None):
        """Both CLIPs' states and SDXL's added conditions (pooled text embeds, 6 size / crop ids)."""
        config = model.config
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        return {
            **super().random_condition(model, batch, generator, tokens),
            "added_cond_kwargs": {"text_embeds": torch.randn(batch, pooled, generator=generator),
                                  "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * batch)},
        }  # fmt: skip


def build_tiny_xl():
    torch.manual_seed(20)
    unet = UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # time ids x their embedding width + pooled text
        cross_attention_dim=64,  # the two encoders' widths, concatenated
        norm_num_groups=8,
    )
    torch.manual_seed(21)
    vae = tiny_vae(64)
    tokenizer = load_tokenizer()
    torch.manual_seed(22)
    text_encoder = clip_text_encoder(tokenizer, hidden=32, layers=2, heads=4, max_tokens=MAX_TOKENS)
    torch.manual_seed(23)
    text_encoder_2 = clip_text_encoder(tokenizer, hidden=32, layers=2, heads=4, max_tokens=MAX_TOKENS, projection=32)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=load_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


StableDiffusionXL.zoo = {"tiny-xl": build_tiny_xl}
