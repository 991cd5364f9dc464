"""The built-in models (`zoo:NAME`), gathered from the model families that build them (families/*.py).

zoo:tiny (SD-1.x, random, for tests), zoo:emoji (SD-1.x, pretrained here, shipped), zoo:emoji-init (its
architecture, random) and zoo:tiny-xl (SDXL, random). The builders live beside their family's description.
"""

from __future__ import annotations

from quantune.assets import EMOJI_DIR, MAX_TOKENS, load_tokenizer
from quantune.families import zoo
from quantune.families.sd import EMOJI_TOKENS, build_emoji, build_emoji_init, build_tiny, tiny_components
from quantune.families.sdxl import build_tiny_xl

ZOO = zoo()

__all__ = [
    "EMOJI_DIR",
    "EMOJI_TOKENS",
    "MAX_TOKENS",
    "ZOO",
    "build_emoji",
    "build_emoji_init",
    "build_tiny",
    "build_tiny_xl",
    "load_tokenizer",
    "tiny_components",
]
