"""Quantization: primitives, integer layers, `quantize_`, IntLoRA (see each module's header for the math)."""

from quantune.quant.config import QuantConfig
from quantune.quant.layers import ActQuantizer, QuantConv2d, QuantLinear, from_float, from_int
from quantune.quant.quantize import calibrate, load_quantized_model, quantize_, save_quantized_model, weight_memory

__all__ = [
    "ActQuantizer",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "calibrate",
    "from_float",
    "from_int",
    "load_quantized_model",
    "quantize_",
    "save_quantized_model",
    "weight_memory",
]
