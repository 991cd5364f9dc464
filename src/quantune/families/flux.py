"""FLUX.1 (Black Forest Labs 2024; the rectified-flow MMDiT of arXiv:2403.03206 with parallel single-stream blocks):
`FluxPipeline`, a `FluxTransformer2DModel` (double-stream blocks with joint attention, then single-stream blocks;
rotary position embeddings over (text, row, column) ids), on latents packed into 2 x 2 patches
([B, C, H, W] -> [B, H/2 * W/2, 4C]), conditioned on T5's states (`encoder_hidden_states`, their ids `txt_ids`)
and CLIP's pooled output (`pooled_projections`). FLUX.1-dev embeds a distilled guidance scale
(`guidance_embeds`), which training feeds as `train.guidance` (diffusers' FLUX scripts: 3.5); FLUX.1-schnell has
none. The transformer takes the timestep as sigma (t / 1000). A flow-matching model (train/flow_matching.py).
Packing and the ids are the pipeline's own static helpers (`_pack_latents`, `_unpack_latents`,
`_prepare_latent_image_ids`), as diffusers' FLUX training scripts call them. Text-encoder LoRA adapts CLIP only.

zoo:tiny-flux: the sizes of diffusers' FLUX pipeline tests (2 heads of 16, RoPE axes (4, 4, 8), joint width 32,
pooled 32), one double- and one single-stream block, guidance embedding on (dev-style), zoo:tiny's VAE at 32 px
(16 x 16 latents of 4 channels -> 64 tokens of 16), a 2-layer CLIP and a 2-layer T5 of width 32, the shipped
tokenizer for both, FLUX.1-dev's scheduler settings (dynamic shifting).

zoo:emoji-dit-init: the start of zoo:emoji-dit's pretraining recipe (configs/emoji_dit_pretrain*.toml): a FLUX.1
transformer of zoo:emoji's size (6.25 M parameters: 2 double- and 6 single-stream blocks, 6 heads of 32, RoPE axes
(8, 12, 12), no guidance embedding: classifier-free guidance comes from caption dropout, as zoo:emoji's), random, on
zoo:emoji's trained VAE (32 px -> 8 x 8 x 4 latents -> 16 tokens of 16) and its trained 4-layer CLIP as both text
encoders (its 16-token states stand in for T5's: the sequence FLUX attends to, width 128; its pooled output for
CLIP's), rectified flow without shift (16 image tokens: FLUX's resolution-dependent shift is for thousands).
"""

from __future__ import annotations

import json

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

from quantune.assets import EMOJI_DIT_DIR, MAX_TOKENS, emoji_parts, load_tokenizer
from quantune.errors import QuantuneError
from quantune.families.base import Conditioning, Family
from quantune.families.encoders import t5_encoder
from quantune.families.sd import EMOJI_TOKENS, build_emoji, clip_text_encoder, tiny_vae


class Flux(Family):
    name = "flux"
    pipeline_classes = ("FluxPipeline", "FluxImg2ImgPipeline")
    denoiser_classes = ("FluxTransformer2DModel",)
    denoiser = "transformer"
    t5_tokens = 512  # FLUX.1-dev's max_sequence_length (schnell: 256)
    t5_tokenizer = "tokenizer_2"
    objective = "flow"
    text_encoders = ("text_encoder", "text_encoder_2")
    lora_text_encoders = ("text_encoder",)  # CLIP; T5 stays frozen
    # the attention projections of both streams (a single-stream block's attention has q / k / v only: its output
    # projection, proj_out, is shared with the MLP); the default adds the feed-forwards, as diffusers'
    # train_dreambooth_lora_flux.py does
    attention_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                         "attn.add_v_proj", "attn.to_add_out")  # fmt: skip
    denoiser_targets = (*attention_targets, "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")

    # PTQ: 8-bit weights for the patch and context embedders, the time / guidance / pooled-text embedders, every
    # adaLN modulation (one row per sample: no speed cost, and its error scales every token), the output norm's
    # modulation and the last layer, whose input stays float (EDA-DM keeps the first and last layers at 8 bits)
    ptq_keep_8bit = ("x_embedder", "context_embedder", r"time_text_embed\..*", r".*\.norm1(_context)?\.linear",
                     r"single_transformer_blocks\.\d+\.norm\.linear", r"norm_out\.linear", "^proj_out$")  # fmt: skip
    ptq_act_fp = ("x_embedder", "^proj_out$")  # see PATCH_EMBED_NOTE in families/base.py
    ptq_shared_inputs = ("txt_ids", "img_ids")  # [tokens, 3] position ids, no batch dim

    def ptq_unit_types(self) -> tuple[type, ...]:
        """The double-stream (joint) and single-stream blocks."""
        return FluxTransformerBlock, FluxSingleTransformerBlock

    def tdac_feature_module(self, model):
        """The middle block counting both kinds (19 double- + 38 single-stream in FLUX.1: single block 9); a
        single-stream block's `hidden_states` input is the image tokens alone (it concatenates the text inside)."""
        double, single = model.transformer_blocks, model.single_transformer_blocks
        middle = (len(double) + len(single)) // 2
        return double[middle] if middle < len(double) else single[middle - len(double)]

    def default_size(self, pipe) -> int:
        """The VAE's sample size (FLUX.1: 1024 px): the transformer has no sample size of its own."""
        return int(pipe.vae.config.sample_size)

    def condition(self, pipe, captions: list[str], size: tuple[int, int]) -> Conditioning:
        device = self.denoiser_of(pipe).device
        states, pooled, text_ids = pipe.encode_prompt(
            captions, None, device=device, max_sequence_length=self.max_tokens(pipe)
        )
        return {"encoder_hidden_states": states, "pooled_projections": pooled, "txt_ids": text_ids}

    def guidance_kwargs(self, pipe, scale: float | None, batch: int) -> dict:
        """FLUX.1-dev embeds its distilled guidance (`guidance_scale`); a transformer without that embedding runs
        classifier-free guidance only when it was trained for it (caption dropout: zoo:emoji-dit, marked by
        `_classifier_free_guidance` in its config), as FluxPipeline's true CFG (`true_cfg_scale`, an empty negative
        prompt per image); else guidance is left out, as diffusers does for FLUX.1-schnell."""
        config = self.denoiser_of(pipe).config
        if scale is None or config.guidance_embeds:
            return super().guidance_kwargs(pipe, scale, batch)
        if config.get("_classifier_free_guidance", False) and scale > 1:
            return {"true_cfg_scale": scale, "negative_prompt": [""] * batch}
        return {}

    def latent_channels(self, model) -> int:
        return int(model.config.in_channels) // 4  # packed 2 x 2

    def random_condition(self, model, batch, generator, tokens=None):
        """T5 states [B, tokens (512), joint_attention_dim], CLIP's pooled embedding, the text's position ids."""
        config = model.config
        tokens = tokens or self.t5_tokens
        states = torch.randn(batch, tokens, config.joint_attention_dim, generator=generator)
        pooled = torch.randn(batch, config.pooled_projection_dim, generator=generator)
        return {
            "encoder_hidden_states": states,
            "pooled_projections": pooled,
            "txt_ids": torch.zeros(tokens, 3),
        }

    def predict(self, pipe, model, noisy, t, cond, guidance=None) -> torch.Tensor:
        b, c, h, w = noisy.shape
        states = cond["encoder_hidden_states"]
        packed = FluxPipeline._pack_latents(noisy.to(states.dtype), b, c, h, w)  # [B, h/2 * w/2, 4C]
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, states.dtype)
        embeds = self.denoiser_of(pipe).config.guidance_embeds
        g = torch.full((b,), 3.5 if guidance is None else guidance, device=noisy.device) if embeds else None
        out = model(
            hidden_states=packed, timestep=t.to(states.dtype) / 1000, guidance=g,
            pooled_projections=cond["pooled_projections"], encoder_hidden_states=states, txt_ids=cond["txt_ids"],
            img_ids=img_ids,
        ).sample  # fmt: skip
        scale = pipe.vae_scale_factor
        return FluxPipeline._unpack_latents(out, h * scale, w * scale, scale)


def build_tiny_flux():
    torch.manual_seed(50)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    torch.manual_seed(51)
    vae = tiny_vae(32, shift_factor=0.1159)  # the shift of the real model's VAE
    tokenizer = load_tokenizer()
    torch.manual_seed(52)
    clip = clip_text_encoder(tokenizer, hidden=32, layers=2, heads=4, max_tokens=MAX_TOKENS)
    torch.manual_seed(53)
    t5 = t5_encoder(tokenizer, width=32, layers=2, heads=4)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5,
        tokenizer_2=load_tokenizer(), transformer=transformer,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_emoji_dit_init():
    """zoo:emoji-dit-init (module docstring): a random FLUX.1 transformer on zoo:emoji's VAE and text encoder."""
    torch.manual_seed(60)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=6, attention_head_dim=32, num_attention_heads=6,
        joint_attention_dim=128, pooled_projection_dim=128, guidance_embeds=False, axes_dims_rope=(8, 12, 12),
    )  # fmt: skip
    return _on_emoji(transformer, FlowMatchEulerDiscreteScheduler(shift=1.0))


def build_emoji_dit():
    """zoo:emoji-dit: the pretrained transformer shipped in models/assets/emoji-dit (fp16 on disk, fp32 in memory)
    on zoo:emoji's VAE and text encoder."""
    if not (EMOJI_DIT_DIR / "parts.json").is_file():
        raise QuantuneError(
            f"zoo:emoji-dit's weights are missing from {EMOJI_DIT_DIR}: reinstall quantune, or train them with "
            "configs/emoji_dit_pretrain.toml and package them (python -m quantune.models.package_emoji --zoo "
            "emoji-dit PIPELINE)"
        )
    if json.loads((EMOJI_DIT_DIR / "parts.json").read_text()) != emoji_parts():
        raise QuantuneError(
            "zoo:emoji-dit was trained on another zoo:emoji VAE / text encoder than the installed ones: reinstall "
            "quantune, or package zoo:emoji-dit again from its run"
        )
    transformer = FluxTransformer2DModel.from_pretrained(EMOJI_DIT_DIR / "transformer", torch_dtype=torch.float32)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(EMOJI_DIT_DIR / "scheduler")
    return _on_emoji(transformer, scheduler)


def _on_emoji(transformer, scheduler):
    """A FluxPipeline of `transformer` on zoo:emoji's VAE and its CLIP as both text encoders."""
    import copy

    emoji = build_emoji()
    emoji.vae.register_to_config(shift_factor=0.0)  # FLUX's latents are (z - shift) * scale; zoo:emoji's: z * scale
    transformer.register_to_config(_classifier_free_guidance=True)  # caption dropout: Flux.guidance_kwargs
    pipe = FluxPipeline(
        scheduler=scheduler, vae=emoji.vae, text_encoder=emoji.text_encoder, tokenizer=emoji.tokenizer,
        text_encoder_2=copy.deepcopy(emoji.text_encoder), tokenizer_2=load_tokenizer(EMOJI_TOKENS),
        transformer=transformer,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


Flux.zoo = {"tiny-flux": build_tiny_flux, "emoji-dit-init": build_emoji_dit_init, "emoji-dit": build_emoji_dit}
