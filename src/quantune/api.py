"""The short top-level API: save_lora / load_lora on models and pipelines."""

from __future__ import annotations

from pathlib import Path

from quantune.formats import read_lora
from quantune.formats.quantune_format import save_lora as _save_weights
from quantune.io import check_output
from quantune.lora.weights import LoraWeights, apply_lora, get_lora_weights


def save_lora(source, path, config=None, overwrite: bool = False, **extra) -> Path:
    """Save the LoRA of a pipeline/model (or canonical LoraWeights) in the quantune format, atomically; an existing
    file is replaced only with `overwrite`."""
    check_output(path, overwrite, folder=False)
    weights = source if isinstance(source, dict) else get_lora_weights(source)
    _save_weights(weights, path, config.to_json() if config is not None else None, extra)
    return Path(path)


def load_lora(path, into=None, multiplier: float = 1.0, component: str = "unet") -> LoraWeights:
    """Read a LoRA file of any supported format; with `into` (a pipeline or model) also wrap its layers with it."""
    weights, _, _ = read_lora(path, pipe=into, component=component)
    if into is not None:
        apply_lora(into, weights, multiplier)
    return weights
