"""Training: the diffusion objective (the config-driven trainer builds on it)."""

from quantune.train.objective import denoising_loss, encode_prompts

__all__ = ["denoising_loss", "encode_prompts"]
