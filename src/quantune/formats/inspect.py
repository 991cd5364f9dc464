"""A summary of a LoRA file: format, components, module count, ranks, alphas, dtype, size on disk."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from quantune.lora.weights import LoraWeights


def disk_size(path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def describe(weights: LoraWeights, fmt: str, path, metadata: dict | None = None) -> dict:
    components = Counter(k.split(".")[0] for k in weights)
    ranks = Counter(m.rank for m in weights.values())
    alphas = Counter(round(m.alpha, 6) for m in weights.values())
    dtypes = Counter(str(m.down.dtype).removeprefix("torch.") for m in weights.values())
    kinds = Counter("soft-conv" if m.soft else ("conv" if m.down.dim() == 4 else "linear") for m in weights.values())
    params = sum(m.down.numel() + m.up.numel() for m in weights.values())
    return {
        "format": fmt,
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
