"""Activation quantizers: one base with one observation protocol, and the integer model's fixed `ActQuantizer`.

An activation quantizer fake-quantizes a layer's input per tensor with an asymmetric grid (IntLoRA, Guo et al. 2024,
arXiv 2410.21759, section 5; Q-Diffusion, Li et al. 2023, arXiv 2302.04304):
    x_hat = s (clamp(round(x / s) + z, 0, 2^b - 1) - z)
`split` > 0 gives the channels [:split] and [split:] of dim 1 a quantizer each (EDA-DM / Q-Diffusion's shortcut
split: the parts of concat(h, skip) have different ranges). `smooth` > 0 (SmoothQuant, a Linear's input of that
many channels, last dim): the grid runs on x diag(s)^-1, per tensor, and the result is scaled back,
    x_hat = s (.) s_a (clamp(round(x / (s (.) s_a)) + z, 0, 2^b - 1) - z)
i.e. a per-channel step s_j s_a with one zero point; the layer's integers are of W diag(s) (quant/intlayer.py),
so the integer product needs no extra operation (ptq/smooth.py computes s).

Observation protocol (`ActQuantBase`), the same for every activation quantizer:
    begin_observing()  ->  forward(x) calls observe(x) and returns x unchanged  ->  finish_observing()
`observe_activations(quantizers, run)` drives it over what `run()` feeds the model; `finish_observing` fixes the
range and refuses a quantizer that saw nothing. `ActQuantizer` collects samples and searches its range once at the
end (`quantune.quant.calibrate`); PTQ's LSQActQuantizer (ptq/act_lsq.py) searches per batch and smooths by an EMA.
An ActQuantizer never calibrates inside an ordinary forward, and an uncalibrated one refuses to run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from quantune.errors import QuantuneError
from quantune.quant.primitives import QParams, check_bits, fake_quantize, sample_values, search_qparams

MAX_CALIBRATION_SAMPLES = 1 << 20


class ActQuantBase(nn.Module):
    """A per-tensor (or split) activation quantizer with the observation protocol of the module docstring.
    Subclasses give `observe`, `seen`, `quantize` and may give `_reset` and `_finish`."""

    def __init__(self, bits: int, search: str = "l2.4", split: int = 0) -> None:
        super().__init__()
        self.bits = check_bits(bits, "act_bits", high=16)
        self.search, self.split = search, int(split)
        self.observing = False

    @property
    def n_parts(self) -> int:
        return 2 if self.split else 1

    def parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x[:, : self.split], x[:, self.split :]] if self.split else [x]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observe(x)
            return x
        return self.quantize(x)

    # -- the protocol ----------------------------------------------------------------------------------------
    def begin_observing(self) -> None:
        self._reset()
        self.observing = True

    def observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    @property
    def seen(self) -> bool:
        raise NotImplementedError

    def finish_observing(self) -> None:
        if not self.seen:
            raise QuantuneError("calibration saw no input for an activation quantizer: the layer was never called")
        self._finish()
        self.end_observing()

    def end_observing(self) -> None:
        self.observing = False

    def _reset(self) -> None:
        pass

    def _finish(self) -> None:
        pass

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def observe_activations(quantizers: dict[str, ActQuantBase], run: Callable[[], object]) -> list[str]:
    """Run the observation protocol of `quantizers` over `run()` (no gradients). Returns the names that saw no
    input; when there are none, every quantizer's range is fixed (finish_observing), else none is."""
    for q in quantizers.values():
        q.begin_observing()
    try:
        with torch.no_grad():
            run()
        unseen = [n for n, q in quantizers.items() if not q.seen]
        if not unseen:
            for q in quantizers.values():
                q.finish_observing()
    finally:
        for q in quantizers.values():
            q.end_observing()
    return unseen


class ActQuantizer(ActQuantBase):
    """The integer model's fixed activation quantizer: asymmetric, per tensor (per part when split; per channel
    steps s_j s_a when `smooth` gives the channels, module docstring); its range is searched once over every
    observed sample (at most MAX_CALIBRATION_SAMPLES per call, drawn at random)."""

    def __init__(self, bits: int, search: str = "l2.4", split: int = 0, smooth: int = 0) -> None:
        super().__init__(bits, search, split)
        if smooth and split:
            raise QuantuneError("an activation quantizer is either split or smoothed, not both")
        self.register_buffer("scale", torch.ones(self.n_parts, 1))
        self.register_buffer("zero_point", torch.zeros(self.n_parts, 1))
        self.register_buffer("calibrated", torch.tensor(False))
        self.register_buffer("smooth", torch.ones(smooth) if smooth else None)  # SmoothQuant's s (last dim)
        self._seen: list[list[torch.Tensor]] = []

    @property
    def channels(self) -> int:
        """The smoothed channels (0: not smoothed)."""
        return 0 if self.smooth is None else self.smooth.numel()

    def qparams(self, part: int = 0) -> QParams:
        return QParams(self.scale[part : part + 1], self.zero_point[part : part + 1], self.bits)

    def observe(self, x: torch.Tensor) -> None:
        x = x / self.smooth if self.smooth is not None else x
        self._seen.append([sample_values(p, MAX_CALIBRATION_SAMPLES).cpu() for p in self.parts(x)])

    @property
    def seen(self) -> bool:
        return bool(self._seen)

    def _reset(self) -> None:
        self._seen = []

    def _finish(self) -> None:
        for i in range(self.scale.shape[0]):
            seen = torch.cat([s[i] for s in self._seen])
            qp = search_qparams(seen, self.bits, per_channel=False, search=self.search)
            self.scale[i].copy_(qp.scale.reshape(1))
            self.zero_point[i].copy_(qp.zero_point.reshape(1))
        self.calibrated.fill_(True)

    def end_observing(self) -> None:
        super().end_observing()
        self._seen = []

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.calibrated):
            raise QuantuneError(
                "an activation quantizer is not calibrated: run quantune.quant.calibrate(model, batches) first"
            )
        if self.smooth is not None:
            return (fake_quantize(x / self.smooth, self.qparams(0)) * self.smooth).to(x.dtype)
        out = [fake_quantize(p, self.qparams(i)) for i, p in enumerate(self.parts(x))]
        return (torch.cat(out, 1) if self.split else out[0]).to(x.dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, split={self.split}, smooth={self.channels}, calibrated={bool(self.calibrated)}"
