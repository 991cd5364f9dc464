"""The quantune LoRA file: safetensors with full dotted keys and a per-module alpha, config in the metadata.

Keys: "<component>.<path>.lora_down.weight" (A), ".lora_up.weight" (B), ".alpha" (0-d float32), so a file
states its own scales with no outside convention. Metadata: {"format": "quantune-lora", "format_version": "1",
"soft_modules": JSON list of soft conv keys, "lora_config": the LoraConfig JSON when known, plus user fields}.
"""

from __future__ import annotations

import json

import torch

from quantune.errors import QuantuneError
from quantune.io import load_safetensors, save_safetensors
from quantune.lora.weights import LoraModule, LoraWeights

FORMAT_NAME = "quantune-lora"


def to_state_dict(weights: LoraWeights) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    sd = {}
    for key, mod in weights.items():
        sd[f"{key}.lora_down.weight"] = mod.down
        sd[f"{key}.lora_up.weight"] = mod.up
        sd[f"{key}.alpha"] = torch.tensor(mod.alpha, dtype=torch.float32)
    soft = sorted(k for k, m in weights.items() if m.soft)
    return sd, {"format": FORMAT_NAME, "format_version": "1", "soft_modules": json.dumps(soft)}


def from_state_dict(sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> LoraWeights:
    soft = set(json.loads(metadata.get("soft_modules", "[]")))
    weights: LoraWeights = {}
    for name in sd:
        if not name.endswith(".lora_down.weight"):
            if not name.endswith((".lora_up.weight", ".alpha")):
                raise QuantuneError(f"unexpected key {name!r} in a quantune LoRA file: the file is damaged")
            continue
        key = name[: -len(".lora_down.weight")]
        try:
            up, alpha = sd[f"{key}.lora_up.weight"], float(sd[f"{key}.alpha"])
        except KeyError as e:
            raise QuantuneError(f"quantune LoRA file lacks {e.args[0]!r}: the file is damaged") from None
        weights[key] = LoraModule(down=sd[name], up=up, alpha=alpha, soft=key in soft)
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
