"""Quantization core: the shared vocabulary (WeightQuant, ActQuant), primitives, activation quantizers, registered
integer layers and kernels, `quantize_`, IntLoRA (see each module's header for the math; docs/intlora.md,
docs/quantization.md)."""

from quantune.quant.act import ActQuantBase, ActQuantizer, observe_activations
from quantune.quant.config import ActQuant, QuantConfig, WeightQuant
from quantune.quant.intlayer import IntLayer, register_int_layer
from quantune.quant.layers import QuantConv2d, QuantLinear, from_float, from_int, quantize_layer
from quantune.quant.quantize import calibrate, load_quantized_model, quantize_, save_quantized_model, weight_memory

__all__ = [
    "ActQuant",
    "ActQuantBase",
    "ActQuantizer",
    "IntLayer",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "WeightQuant",
    "calibrate",
    "from_float",
    "from_int",
    "load_quantized_model",
    "observe_activations",
    "quantize_",
    "quantize_layer",
    "register_int_layer",
    "save_quantized_model",
    "weight_memory",
]
