"""A pipeline folder that keeps an adapter in place, not merged (lora_wrapper's "embed": base weights and the
adapter's structure saved together, so the model can be sampled at any strength or trained further).

Layout: the base pipeline as a diffusers folder (an integer denoiser as quantune's integer folder,
models/integer.py), plus ADAPTER (the adapter in the quantune format, any type: LoRA, LoHa, LoKr, DoRA) and MARKER
({"adapter": ADAPTER, "strength": s}). `load_pipeline(DIR)` loads the base and wraps the adapted modules at strength
s (`set_lora_multiplier` changes it); `quantune train` with model.pretrained = DIR trains that adapter further;
`quantune lora extract --tuned DIR` gives it back exactly. diffusers' own `from_pretrained` reads the folder as the
base model (it ignores the two files).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from quantune.errors import QuantuneError
from quantune.formats.quantune_format import load_lora, save_lora
from quantune.lora.inject import lora_layers, remove_lora
from quantune.lora.weights import LoraWeights, apply_lora, canonicalize, components_of
from quantune.models.integer import save_integer_pipeline

MARKER = "quantune_adapter.json"
ADAPTER = "quantune_adapter.safetensors"


def is_embedded(path) -> bool:
    return (Path(path) / MARKER).is_file()


def save_embedded(pipe, weights: LoraWeights, out, strength: float = 1.0, overwrite: bool = False) -> Path:
    """Write `pipe` (without adapter layers) and `weights` as one folder, atomically."""
    if not math.isfinite(strength):
        raise QuantuneError(f"the adapter's strength must be a finite number, not {strength}")
    if not weights:
        raise QuantuneError("there is no adapter to embed")
    if any(lora_layers(m) for m in components_of(pipe).values()):
        raise QuantuneError("the pipeline already carries adapter layers: embed into its base model (a `lora embed` "
                            "folder is merged first by the command line)")  # fmt: skip
    apply_lora(pipe, weights)  # every module there and of the right shape, or one error line, before any write
    for model in components_of(pipe).values():
        remove_lora(model)
    extra = {ADAPTER: lambda path: save_lora(weights, path), MARKER: {"adapter": ADAPTER, "strength": strength}}
    return save_integer_pipeline(pipe, out, extra=extra, overwrite=overwrite)


def embedded_adapter(path) -> tuple[LoraWeights, float]:
    """The adapter of an embed folder and its strength; a damaged marker is one error line."""
    path = Path(path)
    try:
        info = json.loads((path / MARKER).read_text())
        strength = float(info["strength"])
        adapter = path / str(info["adapter"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise QuantuneError(f"{path / MARKER} is unreadable ({e}): embed the adapter again") from None
    if adapter.parent != path or not adapter.is_file():
        raise QuantuneError(f"{path / MARKER} names {adapter.name}, which is not in {path}: embed the adapter again")
    weights, _ = load_lora(adapter)
    return weights, strength


def attach_embedded(pipe, path) -> LoraWeights:
    """Wrap the pipeline's modules with the folder's adapter at its strength (in place, not merged)."""
    weights, strength = embedded_adapter(path)
    weights = canonicalize(weights, pipe)
    apply_lora(pipe, weights, multiplier=strength)
    return weights
