"""Stable Diffusion 1.x / 2.x (Rombach et al. 2022, LDM): `StableDiffusionPipeline` with a
`UNet2DConditionModel` conditioned on one CLIP text encoder's last hidden states; also the unconditional
`DDPMPipeline` / `DDIMPipeline` UNets (no text encoder). Built-in models: zoo:tiny (random, for tests), zoo:emoji
(pretrained here, shipped) and zoo:emoji-init (zoo:emoji's architecture, random: its recipe's start).

zoo:tiny is a real `StableDiffusionPipeline` at toy size: a UNet2DConditionModel with cross-attention
(CrossAttn down/up blocks, a mid block, 3x3 convs and 1x1 proj_in/out), an AutoencoderKL, a CLIPTextModel and the
generated CLIP-style tokenizer. Every weight is drawn from torch's generator seeded per component, so two builds
are bit-identical.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from quantune.assets import EMOJI_DIR, MAX_TOKENS, load_tokenizer
from quantune.errors import QuantuneError
from quantune.families.base import Conditioning, Family

EMOJI_TOKENS = 16  # Unicode names are short; 16 positions keep the text encoder and cross-attention cheap


class StableDiffusion(Family):
    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "DDPMPipeline", "DDIMPipeline")
    denoiser_classes = ("UNet2DConditionModel", "UNet2DModel")
    ptq_keep_8bit = ("time_embedding.linear_1", "conv_out")  # EDA-DM: the time embedding's first and the last layer
    ptq_act_fp = ("conv_out",)  # EDA-DM: the last conv's input stays float

    def extra_match(self, pipe) -> bool:
        return getattr(self.denoiser_of(pipe).config, "addition_embed_type", None) is None

    def condition(self, pipe, captions: list[str], size: tuple[int, int]) -> Conditioning:
        device = self.denoiser_of(pipe).device
        states, _ = pipe.encode_prompt(captions, device, 1, False)
        return {"encoder_hidden_states": states}

    def ptq_unit_types(self) -> tuple[type, ...]:
        """ResNet blocks, transformer blocks and lone attentions (Q-Diffusion / EDA-DM's UNet units)."""

        return ResnetBlock2D, BasicTransformerBlock, Attention

    def tdac_feature_module(self, model: nn.Module) -> nn.Module:
        """The mid block's first attention (its input, the bottleneck features), or the mid block itself."""
        mid = getattr(model, "mid_block", None)
        if mid is None:
            return super().tdac_feature_module(model)
        attns = [a for a in getattr(mid, "attentions", None) or [] if a is not None]
        return attns[0] if attns else mid


def clip_text_encoder(tokenizer, hidden: int, layers: int, heads: int, max_tokens: int, projection: int = 0):
    """A CLIP text encoder (with a text projection of width `projection` when > 0) sized to the tokenizer."""

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden if hidden > 32 else 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_tokens,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **({"projection_dim": projection} if projection else {}),
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def ddim_scheduler():
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def tiny_vae(sample_px: int, shift_factor: float | None = None):
    """zoo:tiny's VAE (2 levels: 4 latent channels at half the image side); SD3 / FLUX-style VAEs shift their
    latents too (`shift_factor`; those have no quant convs)."""
    shifted = {"shift_factor": shift_factor, "use_quant_conv": False, "use_post_quant_conv": False}
    return AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=sample_px,
        **(shifted if shift_factor is not None else {}),
    )


def _pipeline(**components):
    pipe = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_components(sample_px: int = 64) -> dict:
    """The components of zoo:tiny, deterministic (seeded per component)."""

    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=sample_px // 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
        in_channels=4,
        out_channels=4,
    )
    torch.manual_seed(1)
    vae = tiny_vae(sample_px)
    torch.manual_seed(2)
    text_encoder = clip_text_encoder(tokenizer, hidden=32, layers=2, heads=4, max_tokens=MAX_TOKENS)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=ddim_scheduler())


def build_tiny():
    return _pipeline(**tiny_components())


def build_emoji_init():
    """zoo:emoji's architecture with random weights: the starting point of its pretraining recipe (configs/).

    32 px images; an AutoencoderKL with 3 levels (8x8x4 latents, factor 4); a UNet2DConditionModel with
    cross-attention at 8x8 and 4x4 (block channels 64, 128, 128); a 4-layer CLIP text encoder of width 128.
    """

    tokenizer = load_tokenizer(EMOJI_TOKENS)
    torch.manual_seed(10)
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=16,
        layers_per_block=1,
        sample_size=32,
    )
    torch.manual_seed(11)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    torch.manual_seed(12)
    text_encoder = clip_text_encoder(tokenizer, hidden=128, layers=4, heads=4, max_tokens=EMOJI_TOKENS)
    return _pipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=ddim_scheduler())


def build_emoji():
    """zoo:emoji: the pretrained emoji pipeline shipped in models/assets/emoji (fp16 on disk, fp32 in memory)."""

    if not (EMOJI_DIR / "model_index.json").is_file():
        raise QuantuneError(
            f"zoo:emoji's weights are missing from {EMOJI_DIR}: reinstall quantune, or rebuild them with the recipe "
            "in configs/emoji_vae.toml and configs/emoji_pretrain.toml"
        )
    pipe = StableDiffusionPipeline.from_pretrained(str(EMOJI_DIR), torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


StableDiffusion.zoo = {"tiny": build_tiny, "emoji": build_emoji, "emoji-init": build_emoji_init}
