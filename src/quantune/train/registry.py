"""The trainer's methods by config name (`method = ...`): float ones (train/methods.py) and quantized ones
(train/quant_methods.py)."""

from __future__ import annotations

from quantune.train.methods import FullMethod, LoraMethod, TrainingMethod
from quantune.train.quant_methods import QUANT_METHODS

METHODS: dict[str, type[TrainingMethod]] = {"lora": LoraMethod, "full": FullMethod, **QUANT_METHODS}
