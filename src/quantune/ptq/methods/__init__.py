"""PTQ methods, one file each, registered by name in METHODS (registration order is the order listed in errors):
minmax (min-max ranges, round to nearest), qdiffusion (Q-Diffusion, Li et al. 2023, arXiv 2302.04304) and eda-dm
(EDA-DM, arXiv 2401.04585), and eda-dm-reference (EDA-DM with its reference code's settings).
ptq/methods/base.py describes the seam; docs/quantization.md the methods."""

import importlib

from quantune.ptq.methods.base import (
    METHODS,
    NoOptions,
    PTQMethod,
    Reconstructing,
    method_class,
    method_for,
    register_method,
)

BUILTIN = ("minmax", "qdiffusion", "eda_dm", "eda_dm_reference")  # modules that register a method, in this order
for _module in BUILTIN:
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["METHODS", "NoOptions", "PTQMethod", "Reconstructing", "method_class", "method_for", "register_method"]
