"""Activation quantizer for reconstruction: a learned per-tensor step size (LSQ, Esser et al. 2020) with a fixed
zero point, initialised by the L2.4 search per calibration batch smoothed by an EMA (0.9 old / 0.1 new), and QDrop
(Wei et al. 2022): while reconstructing, each element is quantized with probability 1 - p and left in float
otherwise (EDA-DM, arXiv 2401.04585; docs/quantization.md). `split` > 0 quantizes channels [:split] and [split:]
of dim 1 separately (the shortcut split). Exported as the integer model's fixed ActQuantizer (`to_act_quantizer`).
It follows the activation quantizers' observation protocol (quant/act.py: ActQuantBase); `observe` also works
outside it (one batch, directly).

    x_hat = s (clamp(round(x / s) + z, 0, 2^b - 1) - z),   d x_hat / d s by the straight-through estimator
The step size is learned as log s (s = exp(theta)): Adam's steps are then relative changes of s, so one lr_a
suits every layer whatever its range (EDA-DM's reference learns s itself with an absolute lr_a: an Adam step of
1e-3 is 3 % of a step size of 0.03 but 0.1 % of one of 1).
"""

from __future__ import annotations

import torch
from torch import nn

from quantune.errors import QuantuneError
from quantune.quant.act import ActQuantBase, ActQuantizer
from quantune.quant.primitives import QParams, fake_quantize, sample_values, search_qparams

EMA = 0.9
SEARCH_SAMPLE = 1 << 18  # the L2.4 search of one batch looks at a random sample of at most this many elements


class LSQActQuantizer(ActQuantBase):
    """The learned-step-size activation quantizer of PTQ reconstruction (module docstring)."""

    def __init__(self, bits: int, split: int = 0, search: str = "l2.4") -> None:
        super().__init__(bits, search, split)
        self.log_scale = nn.Parameter(torch.zeros(self.n_parts))  # theta, s = exp(theta)
        self.register_buffer("zero_point", torch.zeros(self.n_parts))
        self.register_buffer("low", torch.zeros(self.n_parts))  # EMA of -z s (the range's low end) while observing
        self.observed = 0
        self.enabled = True
        self.qdrop = 0.0  # > 0 only while reconstructing

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    def observe(self, x: torch.Tensor) -> None:
        for i, part in enumerate(self.parts(x.detach())):
            # min-max reads every element; the L2.4 search a random sample of at most SEARCH_SAMPLE
            flat = part.reshape(-1).float() if self.search == "minmax" else sample_values(part, SEARCH_SAMPLE)
            qp = search_qparams(flat, self.bits, per_channel=False, search=self.search)
            scale, low = qp.scale.reshape(()), (-qp.zero_point * qp.scale).reshape(())
            if self.observed:
                old = self.scale[i].detach()
                scale, low = EMA * old + (1 - EMA) * scale, EMA * self.low[i] + (1 - EMA) * low
            self.log_scale.data[i], self.low[i] = scale.clamp_min(1e-12).log(), low
            self.zero_point[i] = torch.round(-low / scale).clamp(0, 2**self.bits - 1)
        self.observed += 1

    @property
    def seen(self) -> bool:
        return self.observed > 0

    def _reset(self) -> None:
        self.observed = 0

    def _finish(self) -> None:
        if not (torch.isfinite(self.scale).all() and torch.isfinite(self.zero_point).all()):
            raise QuantuneError("calibration produced NaN/inf activation ranges: check the model's FP outputs")

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        out, scale = [], self.scale
        for i, part in enumerate(self.parts(x)):
            q = fake_quantize(part, QParams(scale[i].reshape(1, 1), self.zero_point[i].reshape(1, 1), self.bits))
            if self.qdrop > 0:
                q = torch.where(torch.rand_like(part) < self.qdrop, part, q)
            out.append(q.to(part.dtype))
        return torch.cat(out, 1) if self.split else out[0]

    def to_act_quantizer(self, smooth: torch.Tensor | None = None) -> ActQuantizer:
        """The fixed quantizer; `smooth`: SmoothQuant's s of the layer (this quantizer saw x / s)."""
        aq = ActQuantizer(self.bits, split=self.split, smooth=0 if smooth is None else smooth.numel())
        with torch.no_grad():
            if smooth is not None:
                aq.smooth.copy_(smooth)
            aq.scale.copy_(self.scale.detach().clamp_min(1e-8).reshape(-1, 1))
            aq.zero_point.copy_(self.zero_point.reshape(-1, 1))
            aq.calibrated.fill_(True)
        return aq
