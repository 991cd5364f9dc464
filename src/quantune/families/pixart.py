"""PixArt-Sigma (Chen et al. 2024, arXiv:2403.04692; PixArt-alpha, arXiv:2310.00426): `PixArtSigmaPipeline`, a
`PixArtTransformer2DModel` (DiT blocks with `ada_norm_single`: one timestep embedding modulates every block;
self-attention, cross-attention to the text, feed-forward), conditioned on T5's last hidden states and their
attention mask (`encoder_attention_mask`, the padding masked out). It predicts epsilon and a learned variance
(out_channels = 2 x in_channels); training and sampling use the epsilon half, as the pipeline does. T5 stays
frozen: there is no text-encoder LoRA. Trains with the DDPM objective (train/objective.py).

zoo:tiny-pixart: the sizes of diffusers' own PixArt-Sigma pipeline tests (2 layers, 3 heads of 8, patch 2,
caption channels 32, cross-attention 24, learned sigma), zoo:tiny's VAE, a 2-layer T5 encoder of width 32 and the
shipped tokenizer standing in for T5's (the pipeline only needs one that pads to a length), a DPM-Solver
scheduler as PixArt-Sigma ships. A tiny transformer has none of the aspect-ratio bins, so every call passes
`use_resolution_binning=False` (`call_kwargs`).
"""

from __future__ import annotations

import torch
from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
from diffusers.models.attention import BasicTransformerBlock

from quantune.assets import load_tokenizer
from quantune.families.base import Conditioning, Family
from quantune.families.encoders import t5_encoder
from quantune.families.sd import tiny_vae

BINNED_SIZES = (32, 64, 128, 256)  # the transformer sample sizes PixArt-Sigma has aspect-ratio bins for


class PixArtSigma(Family):
    name = "pixart"
    pipeline_classes = ("PixArtSigmaPipeline",)  # PixArt-alpha (resolution / aspect-ratio conditions): not yet
    denoiser_classes = ()  # PixArtTransformer2DModel is PixArt-alpha's too: recognised by the pipeline class
    denoiser = "transformer"
    model_classes = ("PixArtTransformer2DModel",)  # a bare model (quantize_model): PixArt-alpha's blocks are alike
    t5_tokens = 300  # PixArt-Sigma's caption length
    text_encoders = ("text_encoder",)
    lora_text_encoders = ()  # T5 stays frozen
    # PTQ: 8-bit weights for the patch embedding, the timestep / caption embedders and the last layer (EDA-DM keeps
    # the first and last layers and the time embedding at 8 bits), whose input stays float
    ptq_keep_8bit = (r"pos_embed\.proj", r"adaln_single\..*", r"caption_projection\..*", "^proj_out$")
    ptq_act_fp = (r"pos_embed\.proj", "^proj_out$")  # see PATCH_EMBED_NOTE in families/base.py

    def ptq_unit_types(self) -> tuple[type, ...]:
        """PixArt's DiT blocks (self-attention, cross-attention, feed-forward under ada_norm_single)."""
        return (BasicTransformerBlock,)

    def call_kwargs(self, pipe) -> dict:
        binned = self.denoiser_of(pipe).config.sample_size in BINNED_SIZES
        return {**super().call_kwargs(pipe), "use_resolution_binning": binned, "clean_caption": False}

    def condition(self, pipe, captions: list[str], size: tuple[int, int]) -> Conditioning:
        device = self.denoiser_of(pipe).device
        states, mask, _, _ = pipe.encode_prompt(
            captions, do_classifier_free_guidance=False, device=device, max_sequence_length=self.max_tokens(pipe)
        )
        return {"encoder_hidden_states": states, "encoder_attention_mask": mask}

    def random_condition(self, model, batch, generator, tokens=None):
        """T5 states [B, tokens (300, PixArt-Sigma's), caption_channels], every token attended."""
        tokens = tokens or self.t5_tokens
        states = torch.randn(batch, tokens, model.config.caption_channels, generator=generator)
        return {"encoder_hidden_states": states, "encoder_attention_mask": torch.ones(batch, tokens)}

    def predict(self, pipe, model, noisy, t, cond, guidance=None) -> torch.Tensor:
        states = cond["encoder_hidden_states"]
        out = model(
            noisy.to(states.dtype),
            encoder_hidden_states=states,
            encoder_attention_mask=cond["encoder_attention_mask"],
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample
        if out.shape[1] == 2 * noisy.shape[1]:  # learned variance: the epsilon half, as the pipeline samples with
            out = out.chunk(2, dim=1)[0]
        return out


def build_tiny_pixart():
    torch.manual_seed(30)
    transformer = PixArtTransformer2DModel(
        sample_size=16,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    torch.manual_seed(31)
    vae = tiny_vae(64)
    tokenizer = load_tokenizer()
    torch.manual_seed(32)
    text_encoder = t5_encoder(tokenizer, width=32, layers=2, heads=4)
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000
    )
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


PixArtSigma.zoo = {"tiny-pixart": build_tiny_pixart}
