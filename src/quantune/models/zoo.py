"""Built-in models: `zoo:tiny` (random, for tests) and the registry that later adds `zoo:emoji`.

zoo:tiny is a real `StableDiffusionPipeline` with the Stable Diffusion architecture at toy size: a
UNet2DConditionModel with cross-attention (CrossAttn down/up blocks, a mid block, 3x3 convs and 1x1 proj_in/out),
an AutoencoderKL, a CLIPTextModel and the generated CLIP-style tokenizer shipped in models/assets/tokenizer.
Every weight is drawn from torch's generator seeded per component, so two builds are bit-identical.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TOKENIZER_DIR = Path(__file__).parent / "assets" / "tokenizer"
MAX_TOKENS = 77


def load_tokenizer(max_tokens: int = MAX_TOKENS) -> CLIPTokenizer:
    """The shipped CLIP-style BPE tokenizer (see tokenizer_gen.py)."""
    return CLIPTokenizer(
        str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), model_max_length=max_tokens
    )


def _clip(tokenizer: CLIPTokenizer, hidden: int, layers: int, heads: int, max_tokens: int) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=4 * hidden if hidden > 32 else 2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=max_tokens,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _pipeline(**components) -> StableDiffusionPipeline:
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
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=sample_px,
    )
    torch.manual_seed(2)
    text_encoder = _clip(tokenizer, hidden=32, layers=2, heads=4, max_tokens=MAX_TOKENS)
    scheduler = _scheduler()
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def build_tiny() -> StableDiffusionPipeline:
    return _pipeline(**tiny_components())


EMOJI_TOKENS = 16  # Unicode names are short; 16 positions keep the text encoder and cross-attention cheap


def build_emoji_init() -> StableDiffusionPipeline:
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
    text_encoder = _clip(tokenizer, hidden=128, layers=4, heads=4, max_tokens=EMOJI_TOKENS)
    return _pipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=_scheduler())


EMOJI_DIR = Path(__file__).parent / "assets" / "emoji"


def build_emoji() -> StableDiffusionPipeline:
    """zoo:emoji: the pretrained emoji pipeline shipped in models/assets/emoji (fp16 on disk, fp32 in memory)."""
    from quantune.errors import QuantuneError

    if not (EMOJI_DIR / "model_index.json").is_file():
        raise QuantuneError(
            f"zoo:emoji's weights are missing from {EMOJI_DIR}: reinstall quantune, or rebuild them with the recipe "
            "in configs/emoji_vae.toml and configs/emoji_pretrain.toml"
        )
    pipe = StableDiffusionPipeline.from_pretrained(str(EMOJI_DIR), torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


ZOO = {"tiny": build_tiny, "emoji": build_emoji, "emoji-init": build_emoji_init}
