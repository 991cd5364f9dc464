"""Files shipped inside the package (models/assets): the generated tokenizer, zoo:emoji's weights, the OpenMoji
feature network. Everything that reads them asks here, so no module walks up the tree to find them."""

from __future__ import annotations

import hashlib
from pathlib import Path

ASSET_DIR = Path(__file__).parent / "models" / "assets"
TOKENIZER_DIR = ASSET_DIR / "tokenizer"
EMOJI_DIR = ASSET_DIR / "emoji"
EMOJI_DIT_DIR = ASSET_DIR / "emoji-dit"  # zoo:emoji-dit's transformer and scheduler (its VAE and CLIP: zoo:emoji's)
FEATURES_FILE = ASSET_DIR / "features" / "openmoji_features.safetensors"
MAX_TOKENS = 77


def load_tokenizer(max_tokens: int = MAX_TOKENS):
    """The shipped CLIP-style BPE tokenizer (models/tokenizer_gen.py made it), padding to `max_tokens`."""
    from transformers import CLIPTokenizer  # deferred on purpose: this bottom module is imported by the CLI

    return CLIPTokenizer(
        str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), model_max_length=max_tokens
    )


EMOJI_PARTS = ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors")


def emoji_parts(folder: Path = EMOJI_DIR) -> dict[str, str]:
    """sha256 of zoo:emoji's VAE and text encoder files in `folder`: the parts zoo:emoji-dit borrows when it loads,
    recorded beside it when it is packaged (models/package_emoji.py) and checked when it loads (families/flux.py)."""
    return {part: hashlib.sha256((folder / part).read_bytes()).hexdigest() for part in EMOJI_PARTS}
