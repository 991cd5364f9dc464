"""Merging LoRAs into a base, mixing LoRAs, and extracting a LoRA from two models.

merge ("upl" in cloneofsimo): W' = W + sum_i w_i * (alpha_i / r_i) B_i A_i per module. Exact.
mix:
  sum    (cloneofsimo "lpl"): up = sum_i w_i s_i B_i, down = sum_i w_i A_i (s_i = alpha_i / r_i folded into B).
         This is NOT the weighted sum of the deltas: (w1 B1 + w2 B2)(w1 A1 + w2 A2) has cross terms w1 w2 B1 A2 and
         w1 w2 B2 A1. Kept because users of cloneofsimo's files expect it; the ranks must be equal.
  concat (cloneofsimo "ljl"): B = [w1 s1 B1 | w2 s2 B2], A = [A1; A2]: exactly sum_i w_i dW_i, rank r1 + r2.
  svd    (kohya svd_merge): dW = sum_i w_i dW_i, re-factored by a truncated SVD at rank R; the relative Frobenius
         error ||dW - B A|| / ||dW|| is reported per module.
extract (cloneofsimo lora_distill, kohya extract_lora_from_models): dW = W_tuned - W_base per Linear/Conv2d,
  truncated SVD U S Vh at rank R, B = U S, A = Vh, then both clamped to the clamp_quantile of their joint values.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from quantune.errors import QuantuneError
from quantune.lora.bases import base_type, weight_shape, with_delta
from quantune.lora.layers import LoraModule
from quantune.lora.weights import (
    LoraWeights,
    check_shapes,
    components_of,
    one_spelling,
    resolve_path,
    split_key,
)
from quantune.modules import set_module
from quantune.targets import matches

logger = logging.getLogger(__name__)


@dataclass
class MixReport:
    rel_errors: dict[str, float] = field(default_factory=dict)  # module -> ||dW - BA|| / ||dW|| (svd mode)

    @property
    def max_error(self) -> float:
        return max(self.rel_errors.values(), default=0.0)

    @property
    def mean_error(self) -> float:
        return sum(self.rel_errors.values()) / len(self.rel_errors) if self.rel_errors else 0.0


def merge_into(pipe_or_model, loras: list[tuple[LoraWeights, float]]) -> int:
    """Add each LoRA at its scale into the base weights (in place). Returns the number of modules changed."""
    components = components_of(pipe_or_model)
    deltas: dict[str, torch.Tensor] = {}
    for weights, scale in loras:
        for key, mod in weights.items():
            component, path = split_key(key)
            base = _module(components, component, path, key)
            mod = mod.for_shape(weight_shape(base))
            check_shapes(key, mod, base)
            d = mod.delta_for(base_type(base).weight(base).detach()) * scale  # DoRA's depends on the weight
            deltas[key] = deltas[key] + d if key in deltas else d
    for key, d in deltas.items():
        if not torch.isfinite(d).all():
            raise QuantuneError(f"the LoRA delta of {key} has NaN or inf values: refusing to merge")
    for key, d in deltas.items():
        component, path = split_key(key)
        base = _module(components, component, path, key)
        merged = with_delta(base, d)  # a float base in place; an integer base quantized again (lora/bases.py)
        if merged is not base:
            set_module(components[component], resolve_path(components[component], path), merged)
    return len(deltas)


def _module(components: dict[str, nn.Module], component: str, path: str, key: str) -> nn.Module:
    real = resolve_path(components[component], path) if component in components else None
    if real is None:
        raise QuantuneError(f"the LoRA module {key} is not in the model: the LoRA was made for another model")
    module = components[component].get_submodule(real)
    if base_type(module) is None:
        raise QuantuneError(f"{key} is a {type(module).__name__}, not a Linear/Conv2d (does it already hold a LoRA?)")
    return module


def mix(loras: list[tuple[LoraWeights, float]], mode: str, rank: int | None = None) -> tuple[LoraWeights, MixReport]:
    """Mix weighted LoRAs into one (see the module docstring for the three modes)."""
    if mode not in ("sum", "concat", "svd"):
        raise QuantuneError(f"unknown mix mode {mode!r}: choose sum, concat or svd")
    if mode == "svd" and (rank is None or rank < 1):
        raise QuantuneError("--mode svd needs --rank R (a positive integer)")
    loras = [
        (one_spelling(weights), s) for weights, s in loras
    ]  # files read without a model spell CLIP paths two ways
    keys = list(dict.fromkeys(k for weights, _ in loras for k in weights))
    out: LoraWeights = {}
    report = MixReport()
    for key in keys:
        parts = [(w[key], s) for w, s in loras if key in w]
        if any(getattr(m, "soft", False) for m, _ in parts):
            raise QuantuneError(f"{key} is a soft conv LoRA: it cannot be mixed")
        shapes = {_flat(_update_shape(m)) for m, _ in parts}
        if len(shapes) > 1:
            raise QuantuneError(
                f"{key}: the LoRAs disagree on its weight shape ({', '.join(map(str, sorted(shapes)))}): they were "
                "made for different models; mix LoRAs of one model"
            )
        if mode != "svd" and not all(isinstance(m, LoraModule) for m, _ in parts):
            kinds = sorted({m.kind for m, _ in parts})
            raise QuantuneError(
                f"{key} is a {'/'.join(kinds)} adapter: --mode {mode} mixes LoRA factors; use --mode svd"
            )
        if mode == "sum":
            if len({m.rank for m, _ in parts}) > 1:
                raise QuantuneError(
                    f"--mode sum needs equal ranks, {key} has {[m.rank for m, _ in parts]}: "
                    "use --mode concat (exact) or --mode svd"
                )
            up = sum(m.up.float() * (m.scale * s) for m, s in parts)
            down = sum(m.down.float() * s for m, s in parts)
            out[key] = LoraModule(down=down, up=up, alpha=float(down.shape[0]))
        elif mode == "concat":
            up = torch.cat([m.up.float() * (m.scale * s) for m, s in parts], dim=1)
            down = torch.cat([m.down.float() for m, _ in parts], dim=0)
            out[key] = LoraModule(down=down, up=up, alpha=float(down.shape[0]))
        else:
            shape = max((_update_shape(m) for m, _ in parts), key=len)  # a conv's kernel, if any part knows it
            delta = sum(m.delta().reshape(shape) * s for m, s in parts)
            out[key], report.rel_errors[key] = factorize(delta, rank)
    return out, report


def _update_shape(mod) -> tuple[int, ...]:
    """The shape of the weight a module's update has, from its factors (a LoHa / LoKr conv's may be flat)."""
    if isinstance(mod, LoraModule):
        return (mod.up.shape[0], *mod.down.shape[1:])
    if hasattr(mod, "update_shape"):
        return tuple(mod.update_shape())
    return tuple(mod.delta().shape)


def _flat(shape: tuple[int, ...]) -> tuple[int, int]:
    return (shape[0], math.prod(shape[1:]))


def factorize(delta: torch.Tensor, rank: int, clamp_quantile: float = 1.0) -> tuple[LoraModule, float]:
    """Truncated SVD of a weight delta into a LoRA (alpha = r, B = U sqrt(S), A = sqrt(S) Vh); returns rel. error."""
    out_f = delta.shape[0]
    mat = delta.float().reshape(out_f, -1)  # [out, in * kh * kw]
    r = min(rank, *mat.shape)
    U, S, Vh = torch.linalg.svd(mat, full_matrices=False)
    root = S[:r].sqrt()
    up = U[:, :r] * root  # [out, r]
    down = root[:, None] * Vh[:r]  # [r, in * kh * kw]
    if clamp_quantile < 1.0:
        values = torch.cat([up.flatten(), down.flatten()]).abs()
        hi = torch.quantile(values[:: max(1, values.numel() // 1_000_000)], clamp_quantile)
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    norm = mat.norm()
    err = float((mat - up @ down).norm() / norm) if norm > 0 else 0.0
    if delta.dim() == 4:
        down = down.reshape(r, *delta.shape[1:])
        up = up.reshape(out_f, r, 1, 1)
    return LoraModule(down=down.contiguous(), up=up.contiguous(), alpha=float(r)), err


def extract(
    base,
    tuned,
    rank: int,
    clamp_quantile: float = 0.99,
    min_rel_change: float = 1e-6,
    targets: list[str] | None = None,
) -> tuple[LoraWeights, MixReport]:
    """A LoRA of rank `rank` for every Linear/Conv2d whose weight differs between `base` and `tuned`."""
    if rank < 1:
        raise QuantuneError("--rank must be a positive integer")
    if not 0.0 < clamp_quantile <= 1.0:
        raise QuantuneError("--clamp-quantile must be in (0, 1]")
    base_c, tuned_c = components_of(base), components_of(tuned)
    out: LoraWeights = {}
    report = MixReport()
    for component, base_model in base_c.items():
        if component not in tuned_c:
            continue
        tuned_modules = dict(tuned_c[component].named_modules())
        for name, module in base_model.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)) or module.weight.dim() not in (2, 4):
                continue
            if targets and not matches(targets, name):
                continue
            other = tuned_modules.get(name)
            if other is None or other.weight.shape != module.weight.shape:
                raise QuantuneError(f"{component}.{name} differs in shape between the two models: same architecture?")
            delta = other.weight.detach().float() - module.weight.detach().float()
            scale = module.weight.detach().float().norm()
            if delta.norm() <= min_rel_change * max(float(scale), 1e-12):
                continue
            key = f"{component}.{name}"
            out[key], report.rel_errors[key] = factorize(delta, rank, clamp_quantile)
    if not out:
        raise QuantuneError("the two models have the same weights in every Linear/Conv2d: nothing to extract")
    logger.debug("extracted %d modules at rank %d (max rel. error %.3g)", len(out), rank, report.max_error)
    return out, report
