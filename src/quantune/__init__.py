"""quantune: fine-tune and compress diffusion models (LoRA, IntLoRA, EDA-DM PTQ, integer inference).

The top-level names are imported lazily so that `quantune --help` and the CLI start without loading diffusers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "LoraConfig": "quantune.lora.config",
    "add_lora": "quantune.lora.inject",
    "remove_lora": "quantune.lora.inject",
    "save_lora": "quantune.api",
    "load_lora": "quantune.api",
    "load_pipeline": "quantune.models.loading",
    "QuantuneError": "quantune.errors",
    "PTQConfig": "quantune.ptq.config",
    "quantize_pipeline": "quantune.ptq.run",
    "save_ptq_pipeline": "quantune.ptq.run",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'quantune' has no attribute {name!r}")
