"""LoHa: the Hadamard product of two low-rank products (LyCORIS; FedPara, Hyeon-Woo et al. 2022,
arXiv:2108.06098).

    dW = (alpha / r) * (W1a W1b) ⊙ (W2a W2b),   W1a, W2a [C_out, r], W1b, W2b [r, C_in (* kh * kw)]

so a rank-r LoHa reaches rank r^2 with the parameters of a rank-2r LoRA. With Tucker (a conv with a kernel,
LyCORIS's use_tucker, peft's use_effective_conv2d) each product is a core T [r, r, kh, kw] contracted with
W_a [r, C_out] and W_b [r, C_in]: (T x_1 W_a^T x_2 W_b^T)[o, i, y, x] = sum_pq T[p, q, y, x] W_a[p, o] W_b[q, i].
Keys: hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b (hada_t1, hada_t2) and alpha, as LyCORIS, kohya tools, ComfyUI
and peft's LoHa write them. Initialisation as LyCORIS: W1b, W2b ~ N(0, 1), W1a ~ N(0, 0.1), W2a = 0 (dW = 0).
"""

from __future__ import annotations

import torch
from torch import nn

from quantune.lora.adapter import register_adapter
from quantune.lora.factored import FactoredLayer, FactoredModule, base_shape, normal_

_PAIRS = (("hada_w1_a", "hada_w1_b", "hada_t1"), ("hada_w2_a", "hada_w2_b", "hada_t2"))


@register_adapter
class LohaModule(FactoredModule):
    """LoHa's factors (see the module docstring) and alpha."""

    kind = "loha"
    kohya_suffixes = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha")

    @staticmethod
    def build(parts: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        products = []
        for a, b, t in _PAIRS:
            if t in parts:
                products.append(torch.einsum("pq...,po,qi->oi...", parts[t], parts[a], parts[b]))
            else:
                products.append(parts[a] @ parts[b])
        return products[0] * products[1] * scale

    @classmethod
    def rank_of(cls, parts: dict[str, torch.Tensor]) -> int:
        return parts["hada_w1_b"].shape[0]

    @classmethod
    def layout_problem(cls, parts: dict[str, torch.Tensor]) -> str | None:
        missing = [k for k in cls.kohya_suffixes[:4] if k not in parts]
        if missing:
            return f"LoHa factor(s) {', '.join(missing)} missing"
        if ("hada_t1" in parts) != ("hada_t2" in parts):
            return "a LoHa has one Tucker core (hada_t1 / hada_t2) without the other"
        shapes = {k: tuple(t.shape) for k, t in parts.items()}
        r = shapes["hada_w1_b"][0]
        if "hada_t1" in parts:
            ok = shapes["hada_t1"] == shapes["hada_t2"] and shapes["hada_t1"][:2] == (r, r)
            ok = ok and all(shapes[k][0] == r and len(shapes[k]) == 2 for k in cls.kohya_suffixes[:4])
        else:
            ok = all(len(s) == 2 for s in shapes.values()) and shapes["hada_w1_a"][1] == r
        ok = ok and shapes["hada_w1_a"] == shapes["hada_w2_a"] and shapes["hada_w1_b"] == shapes["hada_w2_b"]
        return None if ok else f"LoHa factors {shapes} contradict each other"

    @classmethod
    def new_layer(cls, base: nn.Module, rank: int, alpha: float, config, generator=None) -> FactoredLayer:
        out, inp, *kernel = base_shape(base)
        tucker = config.use_tucker and any(k != 1 for k in kernel)
        parts = {}
        for n, (a, b, t) in enumerate(_PAIRS):
            if tucker:
                parts[t] = normal_((rank, rank, *kernel), 0.1, generator)
                a_shape, b_shape = (rank, out), (rank, inp)
            else:
                a_shape, b_shape = (out, rank), (rank, inp * (kernel[0] * kernel[1] if kernel else 1))
            parts[b] = normal_(b_shape, 1.0, generator)
            parts[a] = normal_(a_shape, 0.1, generator) if n == 0 else torch.zeros(a_shape)
        return FactoredLayer(base, cls(parts, float(alpha)))
