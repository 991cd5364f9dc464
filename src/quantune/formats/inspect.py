"""A summary of a LoRA file: format, adapter types and their factors, components, module count, ranks, alphas,
dtype, size on disk."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from quantune.lora.weights import LoraWeights


def disk_size(path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _layer_kind(mod) -> str:
    if getattr(mod, "soft", False):
        return "soft-conv"
    shape = getattr(getattr(mod, "inner", mod), "shape", None)  # a LoHa / LoKr's base shape, when known
    return "conv" if (shape and len(shape) == 4) or any(t.dim() == 4 for t in mod.tensors()) else "linear"


def _factor_names(weights: LoraWeights) -> dict[str, set[str]]:
    names: dict[str, set[str]] = {}
    for m in weights.values():
        names.setdefault(getattr(m, "label", m.kind), set()).update(m.factors)
    return names


def describe(weights: LoraWeights, fmt: str, path, metadata: dict | None = None) -> dict:
    components = Counter(k.split(".")[0] for k in weights)
    ranks = Counter(m.rank for m in weights.values())
    alphas = Counter(round(m.alpha, 6) for m in weights.values())
    dtypes = Counter(str(m.tensors()[0].dtype).removeprefix("torch.") for m in weights.values())
    kinds = Counter(_layer_kind(m) for m in weights.values())
    params = sum(t.numel() for m in weights.values() for t in m.tensors())
    return {
        "format": fmt,
        "adapter_types": dict(Counter(getattr(m, "label", m.kind) for m in weights.values())),
        "factors": {label: sorted(names) for label, names in _factor_names(weights).items()},
        "path": str(path),
        "modules": len(weights),
        "components": dict(components),
        "layer_kinds": dict(kinds),
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "alphas": {str(k): v for k, v in sorted(alphas.items())},
        "dtype": ", ".join(sorted(dtypes)),
        "parameters": params,
        "size_bytes": disk_size(path),
        "metadata_keys": sorted((metadata or {}).keys()),
    }
