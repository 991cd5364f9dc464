"""minmax: min-max ranges for weights (per output channel) and activations (per tensor), round to nearest, no
reconstruction: the floor the learned methods must beat (docs/quantization.md)."""

from __future__ import annotations

from quantune.ptq.methods.base import PTQMethod, register_method


@register_method
class MinMax(PTQMethod):
    """Uniform calibration samples, min-max ranges, round to nearest."""

    name = "minmax"
    search = "minmax"
