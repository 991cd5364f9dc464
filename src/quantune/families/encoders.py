"""Tiny text encoders for the zoo builders, sized to the shipped tokenizer (CLIP's are in families/sd.py)."""

from __future__ import annotations

from transformers import T5Config, T5EncoderModel


def t5_encoder(tokenizer, width: int, layers: int, heads: int) -> T5EncoderModel:
    """A T5 encoder (relative-position attention, RMS norms, gated-GELU feed-forward as T5 v1.1 / Flan-T5, which
    PixArt, SD3 and FLUX use) of `width` sized to the tokenizer's vocabulary."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=width // heads,
        d_ff=2 * width,
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,  # frozen in every family: no dropout (T5Config defaults to 0.1)
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)
