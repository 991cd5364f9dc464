"""Loading diffusion pipelines and the built-in models."""

from quantune.models.loading import load_pipeline, resolve_device
from quantune.models.zoo import build_tiny, load_tokenizer

__all__ = ["load_pipeline", "build_tiny", "load_tokenizer", "resolve_device"]
