"""Stable Diffusion 3 / 3.5 (Esser et al. 2024, arXiv:2403.03206): `StableDiffusion3Pipeline`, an
`SD3Transformer2DModel` (MMDiT: joint attention over the image and text streams, each with its own weights;
SD3.5 adds RMS qk-norm and, in its first layers, a second image-only attention, `dual_attention_layers`),
conditioned on two CLIP encoders (penultimate states concatenated, padded to T5's width) followed by T5's states
along the sequence, and on the two CLIP pooled outputs (`pooled_projections`). A flow-matching model: it trains
with train/flow_matching.py and samples with FlowMatchEulerDiscreteScheduler (shift 3). Text-encoder LoRA adapts
the CLIP encoders (kohya: `lora_te1_`, `lora_te2_`); T5 (`text_encoder_3`) stays frozen.

zoo:tiny-sd3: the SD3.5 features at the sizes of diffusers' SD3 pipeline tests (4 heads of 8, caption projection
32, pooled 64 = two 32-wide CLIP projections), 2 layers with qk-norm and a dual-attention first layer, patch 2 on
16 x 16 latents, zoo:tiny's VAE, two 2-layer CLIP encoders of width 32 and a 2-layer T5 of width 64 (the joint
attention width: the CLIP states, 2 x 32, are padded to it, not cut), the shipped tokenizer for all three.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.models.attention import JointTransformerBlock

from quantune.assets import MAX_TOKENS, load_tokenizer
from quantune.families.base import Conditioning, Family
from quantune.families.encoders import t5_encoder
from quantune.families.sd import clip_text_encoder, tiny_vae


class StableDiffusion3(Family):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    denoiser_classes = ("SD3Transformer2DModel",)
    denoiser = "transformer"
    t5_tokens = 256  # the pipeline's default max_sequence_length
    t5_tokenizer = "tokenizer_3"
    objective = "flow"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    lora_text_encoders = ("text_encoder", "text_encoder_2")  # T5 stays frozen
    # diffusers' train_dreambooth_lora_sd3.py: the joint attention's projections of both streams
    denoiser_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                        "attn.add_v_proj", "attn.to_add_out")  # fmt: skip
    attention_targets = denoiser_targets
    # PTQ: 8-bit weights for the patch embedding, the time / pooled-text and context embedders, every adaLN
    # modulation (one row per sample: no speed cost, and its error scales every token), the output norm's
    # modulation and the last layer, whose input stays float (EDA-DM keeps the first and last layers at 8 bits)
    ptq_keep_8bit = (r"pos_embed\.proj", r"time_text_embed\..*", "context_embedder", r".*\.norm1(_context)?\.linear",
                     r"norm_out\.linear", "^proj_out$")  # fmt: skip
    ptq_act_fp = (r"pos_embed\.proj", "^proj_out$")  # see PATCH_EMBED_NOTE in families/base.py

    def ptq_unit_types(self) -> tuple[type, ...]:
        """The MMDiT joint blocks (both streams, the dual attention of SD3.5's first blocks)."""
        return (JointTransformerBlock,)

    def condition(self, pipe, captions: list[str], size: tuple[int, int]) -> Conditioning:
        device = self.denoiser_of(pipe).device
        states, _, pooled, _ = pipe.encode_prompt(
            captions, None, None, device=device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_tokens(pipe),
        )  # fmt: skip
        return {"encoder_hidden_states": states, "pooled_projections": pooled}

    def random_condition(self, model, batch, generator, tokens=None):
        """77 CLIP + `tokens` (256) T5 states of joint_attention_dim, and the two CLIPs' pooled embeddings."""
        config = model.config
        states = torch.randn(batch, 77 + (tokens or self.t5_tokens), config.joint_attention_dim, generator=generator)
        pooled = torch.randn(batch, config.pooled_projection_dim, generator=generator)
        return {"encoder_hidden_states": states, "pooled_projections": pooled}

    def predict(self, pipe, model, noisy, t, cond, guidance=None) -> torch.Tensor:
        states = cond["encoder_hidden_states"]
        return model(
            hidden_states=noisy.to(states.dtype), timestep=t, encoder_hidden_states=states,
            pooled_projections=cond["pooled_projections"],
        ).sample  # fmt: skip


def build_tiny_sd3():
    torch.manual_seed(40)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        out_channels=4,
        qk_norm="rms_norm",
        dual_attention_layers=(0,),
    )
    torch.manual_seed(41)
    vae = tiny_vae(32, shift_factor=0.0609)  # the shift of the real model's VAE
    tokenizer = load_tokenizer()
    encoders = []
    for seed in (42, 43):
        torch.manual_seed(seed)
        encoders.append(clip_text_encoder(tokenizer, 32, layers=2, heads=4, max_tokens=MAX_TOKENS, projection=32))
    torch.manual_seed(44)
    t5 = t5_encoder(tokenizer, width=64, layers=2, heads=4)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=load_tokenizer(),
        text_encoder_3=t5, tokenizer_3=load_tokenizer(),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


StableDiffusion3.zoo = {"tiny-sd3": build_tiny_sd3}
