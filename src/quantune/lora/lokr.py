"""LoKr: a Kronecker product of a small and a large factor (LyCORIS; KronA, Edalati et al. 2022,
arXiv:2212.10650).

    dW = s * (W1 ⊗ W2),   W1 [a, c], W2 [b, d (, kh, kw)],   C_out = a b, C_in = c d

with (a, b) = factorization(C_out, f), (c, d) = factorization(C_in, f) (`factorization` below: a <= b, a as close
to f as divides, f = -1 as balanced as possible). W2 is full or low-rank W2a [b, r] W2b [r, d (* kh * kw)] (Tucker on
a conv: a core T [r, r, kh, kw] with W2a [r, b], W2b [r, d]); W1 is full or, with decompose_both, W1a [a, r] W1b
[r, c]. s = alpha / r, and s = 1 when neither factor is low-rank (LyCORIS and ComfyUI ignore alpha then; peft keeps
alpha / r, converted on the way in and out). W2 (or W2b) starts at zero, W1 (W1a, W1b, W2a, T) kaiming-uniform.
Keys: lokr_w1 | lokr_w1_a + lokr_w1_b, lokr_w2 | lokr_w2_a + lokr_w2_b (+ lokr_t2) and alpha.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from quantune.lora.adapter import register_adapter
from quantune.lora.factored import FactoredLayer, FactoredModule, base_shape, kaiming_, meta_parts


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dimension and m <= n: m = factor when it divides, else the largest divisor pair whose
    m does not pass `factor` (-1: no bound), stopping where m + n grows (LyCORIS's and peft's rule)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def _small(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    return parts["lokr_w1"] if "lokr_w1" in parts else parts["lokr_w1_a"] @ parts["lokr_w1_b"]


def _large(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    if "lokr_w2" in parts:
        return parts["lokr_w2"]
    a, b = parts["lokr_w2_a"], parts["lokr_w2_b"]
    if "lokr_t2" in parts:
        return torch.einsum("pq...,pb,qd->bd...", parts["lokr_t2"], a, b)
    return (a @ b.reshape(b.shape[0], -1)).reshape(a.shape[0], *b.shape[1:])


@register_adapter
class LokrModule(FactoredModule):
    """LoKr's factors (see the module docstring) and alpha."""

    kind = "lokr"
    kohya_suffixes = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha")

    @classmethod
    def identifies(cls, tensors: dict[str, torch.Tensor]) -> bool:
        return any(k in tensors for k in ("lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a"))

    @staticmethod
    def build(parts: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        w1, w2 = _small(parts), _large(parts)
        w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - 2)))
        return torch.kron(w1, w2.contiguous()) * scale

    @staticmethod
    def low_rank(parts: dict[str, torch.Tensor]) -> bool:
        return "lokr_w1_b" in parts or "lokr_w2_b" in parts

    @classmethod
    def rank_of(cls, parts: dict[str, torch.Tensor]) -> int:
        if "lokr_w2_b" in parts:
            return parts["lokr_w2_b"].shape[0]
        if "lokr_w1_b" in parts:
            return parts["lokr_w1_b"].shape[0]
        return max(parts["lokr_w2"].shape[:2])  # two full factors: the rank that makes peft keep W2 full

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.low_rank(self.parts) else 1.0

    def with_alpha(self, alpha: float) -> LokrModule:
        return self if not self.low_rank(self.parts) else super().with_alpha(alpha)

    @classmethod
    def layout_problem(cls, parts: dict[str, torch.Tensor]) -> str | None:
        if ("lokr_w1" in parts) == ("lokr_w1_a" in parts and "lokr_w1_b" in parts):
            return "a LoKr needs lokr_w1, or lokr_w1_a with lokr_w1_b (one of the two)"
        if ("lokr_w2" in parts) == ("lokr_w2_a" in parts and "lokr_w2_b" in parts):
            return "a LoKr needs lokr_w2, or lokr_w2_a with lokr_w2_b (one of the two)"
        if "lokr_t2" in parts and "lokr_w2" in parts:
            return "a LoKr with a full lokr_w2 has no Tucker core lokr_t2"
        try:
            small, large = _small(meta_parts(parts)), _large(meta_parts(parts))
        except RuntimeError as e:
            return f"LoKr factors {_shapes(parts)} do not multiply ({e})"
        ranks = {parts[k].shape[0] for k in ("lokr_w1_b", "lokr_w2_b") if k in parts}
        if small.dim() != 2 or large.dim() not in (2, 4) or len(ranks) > 1:
            return f"LoKr factors {_shapes(parts)} contradict each other"
        return None

    @classmethod
    def new_layer(cls, base: nn.Module, rank: int, alpha: float, config, generator=None) -> FactoredLayer:
        out, inp, *kernel = base_shape(base)
        (a, b), (c, d) = factorization(out, config.factor), factorization(inp, config.factor)
        parts = {}
        if config.decompose_both and rank < max(a, c) / 2:
            parts["lokr_w1_a"], parts["lokr_w1_b"] = kaiming_((a, rank), generator), kaiming_((rank, c), generator)
        else:
            parts["lokr_w1"] = kaiming_((a, c), generator)
        if rank >= max(b, d) / 2:
            parts["lokr_w2"] = torch.zeros(b, d, *kernel)
        elif config.use_tucker and any(k != 1 for k in kernel):
            parts["lokr_t2"] = kaiming_((rank, rank, *kernel), generator)
            parts["lokr_w2_a"], parts["lokr_w2_b"] = kaiming_((rank, b), generator), torch.zeros(rank, d)
        else:
            flat = d * math.prod(kernel)
            parts["lokr_w2_a"], parts["lokr_w2_b"] = kaiming_((b, rank), generator), torch.zeros(rank, flat)
        module = cls(parts, float(alpha) if cls.low_rank(parts) else float(rank))
        return FactoredLayer(base, module)


def _shapes(parts: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {k: list(t.shape) for k, t in parts.items()}
