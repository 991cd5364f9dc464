"""Post-training quantization of diffusion UNets: minmax, Q-Diffusion and EDA-DM (TDAC + FBR), each a registered
method (ptq/methods/) run by one generic driver (ptq/driver.py); docs/quantization.md.

- `quantize_pipeline(pipe, PTQConfig(...))`: calibration trajectories from the pipeline's sampler, then
  `quantize_model`; `save_ptq_pipeline` writes the integer pipeline.
- `quantize_model(model, batches, cfg)`: a UNet from given batches of its forward keyword arguments.
- `METHODS`: {name: method class}; `register_method` adds one.
"""

from quantune.data.prompts import read_prompts
from quantune.ptq.config import PTQConfig
from quantune.ptq.driver import quantize_model
from quantune.ptq.methods import METHODS, PTQMethod, register_method
from quantune.ptq.run import quantize_pipeline, save_ptq_pipeline

__all__ = [
    "METHODS",
    "PTQConfig",
    "PTQMethod",
    "quantize_model",
    "quantize_pipeline",
    "read_prompts",
    "register_method",
    "save_ptq_pipeline",
]
