"""Loading diffusion pipelines and the built-in models."""

from quantune.models.loading import load_pipeline
from quantune.models.zoo import build_tiny, load_tokenizer

__all__ = ["load_pipeline", "build_tiny", "load_tokenizer"]
