"""AdaRound: learned rounding of weights (Nagel et al. 2020, "Up or Down?", as used by BRECQ, Q-Diffusion and
EDA-DM, arXiv 2401.04585; docs/quantization.md).

Per output channel n, with the scale s_n and zero point z_n of the L2.4 (or min-max) search:
    W_hat = s (clamp(floor(W / s) + h(V) + z, q_min, q_max) - z),
    h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)
with zeta = 1.1, gamma = -0.1; V starts where h(V) = frac(W / s) (so W_hat starts at W clamped to the grid).
After reconstruction the rounding is hard: h = 1[V >= 0]. The optional regulariser
    f_reg = sum (1 - |2 h(V) - 1|^beta),  beta annealed from 20 to 2
pushes h to 0 or 1 (BRECQ / Q-Diffusion); EDA-DM's reference switches it off and relies on the loss alone.

A method that learns no rounding (minmax) uses `NearestQuantizer`: the same grid, W_hat = s (clamp(round(W / s) + z)
- z), with no V and no floor(W / s) kept: AdaRound's two float copies of every weight would triple a 2.5 B model's
memory (SD3.5-medium: 10 GB of weights, 30 GB wrapped).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from quantune.quant.primitives import QParams, search_qparams

ZETA, GAMMA = 1.1, -0.1


class AdaRoundQuantizer(nn.Module):
    def __init__(self, weight: torch.Tensor, bits: int, symmetric: bool, search: str = "l2.4") -> None:
        super().__init__()
        w = weight.detach().float()
        self.shape = w.shape
        rows = w.reshape(w.shape[0], -1)
        qp = search_qparams(rows, bits, per_channel=True, symmetric=symmetric, search=search)
        self.bits = bits
        self.register_buffer("scale", qp.scale)  # buffers: they follow .to(device) with V
        self.register_buffer("zero_point", qp.zero_point if qp.zero_point is not None else None)
        self.register_buffer("w_floor", torch.floor(rows / qp.scale))
        frac = (rows / qp.scale - self.w_floor).clamp(0.01, 0.99)  # h(V) = frac, away from sigmoid's ends
        v0 = -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1)
        self.v = nn.Parameter(v0)
        self.hard = False

    @property
    def qp(self) -> QParams:
        return QParams(self.scale, self.zero_point, self.bits)

    def h(self) -> torch.Tensor:
        if self.hard:
            return (self.v >= 0).float()
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def codes(self) -> torch.Tensor:
        """Integer codes in [q_min, q_max] (float tensor), [C_out, cols]."""
        q = self.w_floor + self.h()
        if self.qp.zero_point is not None:
            q = q + self.qp.zero_point
        return torch.clamp(q, self.qp.qmin, self.qp.qmax)

    def forward(self) -> torch.Tensor:
        q = self.codes()
        if self.qp.zero_point is not None:
            q = q - self.qp.zero_point
        return (q * self.qp.scale).reshape(self.shape)

    def hard_codes(self) -> torch.Tensor:
        self.hard = True
        return self.codes().detach()

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


def beta_schedule(it: int, iters: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> float | None:
    """The regulariser's beta at iteration `it` (None during the warm-up, when the regulariser is off)."""
    if it < warmup * iters:
        return None
    progress = (it - warmup * iters) / max(1.0, (1 - warmup) * iters)
    return end + 0.5 * (start - end) * (1 + math.cos(progress * math.pi))


class NearestQuantizer(nn.Module):
    """Round-to-nearest on AdaRound's grid (module docstring), read from the float layer's weight when called
    (times SmoothQuant's s when given); the interface PTQ uses of AdaRoundQuantizer: forward(), qp, hard_codes()."""

    def __init__(self, layer: nn.Module, bits: int, symmetric: bool, search: str = "l2.4", smooth=None) -> None:
        super().__init__()
        self._layer = [layer]  # the wrapped float layer, not registered twice
        smooth = smooth.to(layer.weight.device) if smooth is not None else None
        self.register_buffer("smooth", smooth, persistent=False)  # follows .to() with the layer
        rows = self._rows()
        qp = search_qparams(rows, bits, per_channel=True, symmetric=symmetric, search=search)
        self.bits, self.shape, self.hard = bits, layer.weight.shape, True
        self.register_buffer("scale", qp.scale)
        self.register_buffer("zero_point", qp.zero_point if qp.zero_point is not None else None)

    @property
    def qp(self) -> QParams:
        return QParams(self.scale, self.zero_point, self.bits)

    def _rows(self) -> torch.Tensor:
        w = self._layer[0].weight.detach().float()
        w = w * self.smooth if self.smooth is not None else w
        return w.reshape(w.shape[0], -1)

    def codes(self) -> torch.Tensor:
        q = torch.round(self._rows() / self.scale)
        if self.zero_point is not None:
            q = q + self.zero_point
        return torch.clamp(q, self.qp.qmin, self.qp.qmax)

    def forward(self) -> torch.Tensor:
        q = self.codes()
        if self.zero_point is not None:
            q = q - self.zero_point
        return (q * self.scale).reshape(self.shape)

    def hard_codes(self) -> torch.Tensor:
        return self.codes().detach()
