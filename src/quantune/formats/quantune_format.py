"""The quantune LoRA file: safetensors with full dotted keys and a per-module alpha, config in the metadata.

Keys: "<component>.<path>.<suffix>" with each adapter type's kohya / LyCORIS suffixes (LoRA: ".lora_down.weight"
(A), ".lora_up.weight" (B), ".alpha" (0-d float32)), so a file states its own scales with no outside convention.
Metadata: {"format": "quantune-lora", "format_version": "1", "soft_modules": JSON list of soft conv keys,
"lora_config": the LoraConfig JSON when known, plus user fields}.
"""

from __future__ import annotations

import json

import torch

from quantune.errors import QuantuneError
from quantune.io import load_safetensors, save_safetensors
from quantune.lora.adapter import group_by_module, module_from_kohya
from quantune.lora.weights import LoraWeights

FORMAT_NAME = "quantune-lora"


def to_state_dict(weights: LoraWeights) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every module's tensors under its adapter type's kohya / LyCORIS suffixes (lora/adapter.py)."""
    sd = {f"{key}.{suffix}": t for key, mod in weights.items() for suffix, t in mod.kohya_tensors().items()}
    soft = sorted(k for k, m in weights.items() if getattr(m, "soft", False))
    return sd, {"format": FORMAT_NAME, "format_version": "1", "soft_modules": json.dumps(soft)}


def from_state_dict(sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> LoraWeights:
    soft = set(json.loads(metadata.get("soft_modules", "[]")))
    grouped = group_by_module(sd)
    known = {f"{key}.{suffix}" for key, tensors in grouped.items() for suffix in tensors}
    unknown = sorted(set(sd) - known)
    if unknown:
        raise QuantuneError(f"unexpected key {unknown[0]!r} in a quantune LoRA file: the file is damaged")
    weights: LoraWeights = {}
    for key, tensors in grouped.items():
        if "alpha" not in tensors:
            raise QuantuneError(f"quantune LoRA file lacks {key + '.alpha'!r}: the file is damaged")
        weights[key] = module_from_kohya(tensors, key)
        if key in soft:
            weights[key].soft = True
    return weights


def save_lora(weights: LoraWeights, path, config_json: str | None = None, extra: dict | None = None) -> None:
    """Write canonical LoRA weights in the quantune format (atomically)."""
    if not weights:
        raise QuantuneError("there is no LoRA to save: the model has no LoRA layers")
    sd, meta = to_state_dict(weights)
    if config_json:
        meta["lora_config"] = config_json
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    save_safetensors(sd, path, meta)


def load_lora(path) -> tuple[LoraWeights, dict[str, str]]:
    """Read a quantune-format file into canonical weights and its metadata."""
    sd, meta = load_safetensors(path)
    if meta.get("format") != FORMAT_NAME:
        raise QuantuneError(f"{path} is not a quantune LoRA file: read it with quantune.formats.read_lora")
    return from_state_dict(sd, meta), meta
