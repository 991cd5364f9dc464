"""Post-training quantization of diffusion UNets: minmax, Q-Diffusion and EDA-DM (TDAC + FBR)."""

from quantune.data.prompts import read_prompts
from quantune.ptq.config import METHODS, PTQConfig
from quantune.ptq.run import quantize_pipeline, save_ptq_pipeline

__all__ = ["METHODS", "PTQConfig", "quantize_pipeline", "read_prompts", "save_ptq_pipeline"]
