"""AdaRound: learned rounding of weights (Nagel et al. 2020, "Up or Down?", as used by BRECQ, Q-Diffusion and
EDA-DM, arXiv 2401.04585; docs/quantization.md).

Per output channel n, with the scale s_n and zero point z_n of the L2.4 (or min-max) search:
    W_hat = s (clamp(floor(W / s) + h(V) + z, q_min, q_max) - z),
    h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)
with zeta = 1.1, gamma = -0.1; V starts where h(V) = frac(W / s) (so W_hat starts at W clamped to the grid).
`groups` (the shortcut split, quant/primitives.py): s and z per row and column group, [C_out, G], spread over the
columns where the grid is applied. After reconstruction the rounding is hard: h = 1[V >= 0]. The optional regulariser
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

from quantune.quant.primitives import QParams, per_column, search_grouped

ZETA, GAMMA = 1.1, -0.1


class _Grid(nn.Module):
    """The per-row (per row and column group) grid both quantizers share: `scale`, `zero_point` [C_out, G]."""

    def _init_grid(self, rows: torch.Tensor, bits: int, symmetric: bool, search: str, groups) -> None:
        self.bits, self.groups = bits, tuple(groups) if groups else None
        qp = search_grouped(rows, bits, self.groups, symmetric=symmetric, search=search)
        self.register_buffer("scale", qp.scale)  # buffers: they follow .to(device)
        self.register_buffer("zero_point", qp.zero_point if qp.zero_point is not None else None)

    @property
    def qp(self) -> QParams:
        """The grid as stored: scale / zero point [C_out, G] (what the integer layer keeps)."""
        return QParams(self.scale, self.zero_point, self.bits)

    @property
    def column_qp(self) -> QParams:
        """The grid per column ([C_out, cols] with groups, else [C_out, 1]): what the codes are computed on."""
        return QParams(per_column(self.scale, self.groups), per_column(self.zero_point, self.groups), self.bits)


class AdaRoundQuantizer(_Grid):
    def __init__(
        self, weight: torch.Tensor, bits: int, symmetric: bool, search: str = "l2.4", groups=None
    ) -> None:  # fmt: skip
        super().__init__()
        w = weight.detach().float()
        self.shape = w.shape
        rows = w.reshape(w.shape[0], -1)
        self._init_grid(rows, bits, symmetric, search, groups)
        scale = self.column_qp.scale
        self.register_buffer("w_floor", torch.floor(rows / scale))
        frac = (rows / scale - self.w_floor).clamp(0.01, 0.99)  # h(V) = frac, away from sigmoid's ends
        v0 = -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1)
        self.v = nn.Parameter(v0)
        self.hard = False

    def h(self) -> torch.Tensor:
        if self.hard:
            return (self.v >= 0).float()
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def codes(self) -> torch.Tensor:
        """Integer codes in [q_min, q_max] (float tensor), [C_out, cols]."""
        qp = self.column_qp
        q = self.w_floor + self.h()
        if qp.zero_point is not None:
            q = q + qp.zero_point
        return torch.clamp(q, qp.qmin, qp.qmax)

    def forward(self) -> torch.Tensor:
        return _dequantize_codes(self.codes(), self.column_qp, self.shape)

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


def _dequantize_codes(q: torch.Tensor, qp: QParams, shape) -> torch.Tensor:
    if qp.zero_point is not None:
        q = q - qp.zero_point
    return (q * qp.scale).reshape(shape)


class NearestQuantizer(_Grid):
    """Round-to-nearest on AdaRound's grid (module docstring), read from the float layer's weight when called
    (times SmoothQuant's s when given); the interface PTQ uses of AdaRoundQuantizer: forward(), qp, hard_codes()."""

    def __init__(
        self, layer: nn.Module, bits: int, symmetric: bool, search: str = "l2.4", smooth=None, groups=None
    ) -> None:  # fmt: skip
        super().__init__()
        self._layer = [layer]  # the wrapped float layer, not registered twice
        smooth = smooth.to(layer.weight.device) if smooth is not None else None
        self.register_buffer("smooth", smooth, persistent=False)  # follows .to() with the layer
        self.shape, self.hard = layer.weight.shape, True
        self._init_grid(self._rows(), bits, symmetric, search, groups)

    def _rows(self) -> torch.Tensor:
        w = self._layer[0].weight.detach().float()
        w = w * self.smooth if self.smooth is not None else w
        return w.reshape(w.shape[0], -1)

    def codes(self) -> torch.Tensor:
        qp = self.column_qp
        q = torch.round(self._rows() / qp.scale)
        if qp.zero_point is not None:
            q = q + qp.zero_point
        return torch.clamp(q, qp.qmin, qp.qmax)

    def forward(self) -> torch.Tensor:
        return _dequantize_codes(self.codes(), self.column_qp, self.shape)

    def hard_codes(self) -> torch.Tensor:
        return self.codes().detach()
