"""Uniform quantization primitives: parameters, range search, quantize / dequantize / fake-quantize, int4 packing.

Uniform affine quantization of a tensor x with b bits (per output channel = per row of x.flatten(1), or per tensor):
    asymmetric:  q = clamp(round(x / s) + z, 0, 2^b - 1),                 x_hat = s (q - z)
    symmetric:   q = clamp(round(x / s), -(2^(b-1) - 1), 2^(b-1) - 1),     x_hat = s q
Range search (`search="l2.4"`, IntLoRA's and q-diffusion's "L2.4 search"): for i = 0..79 shrink the range to
[min (1 - 0.01 i), max (1 - 0.01 i)] (symmetric: max|x| (1 - 0.01 i)), quantize, and keep per row the candidate
with the smallest mean |x_hat - x|^2.4. `search="l2.4-full"` runs i = 0..99, down to 1 % of the range (EDA-DM's
reference code: candidates (i / 100) max|x|, i = 1..100). `search="minmax"` takes i = 0 only.
Column groups (`groups`, the shortcut split of a weight: Q-Diffusion / EDA-DM quantize the input channels of h and
of skip in concat(h, skip) with a weight quantizer each): the columns of a row split into consecutive groups, each
with its own scale and zero point per row, shaped [rows, G]; `per_column` spreads them over the columns.
`offset=0.5` gives a mid-rise grid x_hat = s (q - z + 1/2) (no level at zero; used by IntLoRA's zero-drop fix).
Asymmetric candidates widen [lo, hi] to hold 0 (zero point in [0, 2^b - 1]: weights, activations) unless
`include_zero=False`: then z = round(-lo / s) may leave [0, 2^b - 1] (IntLoRA-MUL's U; IntLoRA, Guo et al. 2024,
arXiv 2410.21759, and docs/intlora.md).

Fake quantization uses the straight-through estimator: round_ste(v) = v + (round(v) - v).detach(); the clamp
passes gradients inside the range and zero outside (the LSQ / q-diffusion convention).

Written by hand: torch.ao's observers have no L2.4 search and store no packed int4; these few lines are the
primitives the quantized layers, IntLoRA and EDA-DM share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantune.errors import QuantuneError

SEARCH_STEPS = 80
SEARCH_CANDIDATES = {"l2.4": SEARCH_STEPS, "l2.4-full": 100, "minmax": 1}  # range candidates of each search
SEARCH_NORM = 2.4
SEARCH_CHUNK = 2**22  # elements of x per candidate chunk of the vectorised search (memory: a few of these)
EPS = 1e-8


def check_bits(bits: int, what: str = "bits", low: int = 2, high: int = 8) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= high:
        raise QuantuneError(f"{what} = {bits!r} is not supported: use an integer from {low} to {high}")
    return bits


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() in the forward, identity in the backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


@dataclass
class QParams:
    """scale (and zero point when asymmetric), shaped [rows, 1] per channel or [1, 1] per tensor ([rows, G] per
    row and column group: `search_grouped`; [rows, cols] once spread by `per_column`)."""

    scale: torch.Tensor
    zero_point: torch.Tensor | None
    bits: int
    offset: float = 0.0  # 0.5: mid-rise grid

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


def _rows(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    return x.reshape(x.shape[0], -1) if per_channel else x.reshape(1, -1)


def _candidate(lo, hi, bits: int, symmetric: bool, offset: float, include_zero: bool = True) -> QParams:
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        return QParams((amax / (2 ** (bits - 1) - 1)).clamp_min(EPS), None, bits, offset)
    if include_zero:
        lo, hi = lo.clamp_max(0), hi.clamp_min(0)  # the grid holds 0 exactly: zero point in [0, 2^b - 1]
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(EPS)
    return QParams(scale, torch.round(-lo / scale), bits, offset)


def sample_values(x: torch.Tensor, limit: int, seed: int = 0) -> torch.Tensor:
    """At most `limit` elements of `x` drawn uniformly at random (seeded), as float. A strided slice would line up
    with the layout (every 320th element of an NCHW tensor with 320 channels sits in one column)."""
    flat = x.detach().reshape(-1)
    if flat.numel() <= limit:
        return flat.float()
    g = torch.Generator(device=flat.device).manual_seed(seed)
    return flat[torch.randint(0, flat.numel(), (limit,), generator=g, device=flat.device)].float()


def search_qparams(
    x: torch.Tensor,
    bits: int,
    *,
    per_channel: bool = True,
    symmetric: bool = False,
    search: str = "l2.4",
    offset: float = 0.0,
    include_zero: bool = True,
) -> QParams:
    """Quantization parameters for `x` (rows = dim 0 when per_channel) by L2.4 search or min-max.

    include_zero (asymmetric only): True widens each candidate range to hold 0, so 0 is a grid level and the zero
    point lies in [0, 2^b - 1] (weights and activations). False searches [min (1 - 0.01 i), max (1 - 0.01 i)] as is,
    z = round(-lo / s) unclamped: the L2.4 search of the IntLoRA paper (arXiv 2410.21759) as IntLoRA-MUL's U quantizer
    and the reference code use it (a row of U that is all positive then gets a zero point <= 0)."""
    check_bits(bits, high=16)
    if search not in SEARCH_CANDIDATES:
        raise QuantuneError(f"search = {search!r} is not supported: use one of {', '.join(SEARCH_CANDIDATES)}")
    x2 = _rows(x.detach().float(), per_channel)
    xmin, xmax = x2.amin(1, keepdim=True), x2.amax(1, keepdim=True)
    if search == "minmax":  # one candidate: no error to compare
        return _candidate(xmin, xmax, bits, symmetric, offset, include_zero)
    shrink = 1.0 - 0.01 * torch.arange(SEARCH_CANDIDATES[search], dtype=torch.float64)
    shrink = shrink.to(torch.float32)
    errors = torch.cat([_search_errors(x2, xmin, xmax, k, bits, symmetric, offset, include_zero)
                        for k in shrink.split(max(1, SEARCH_CHUNK // x2.numel()))])  # fmt: skip
    best = shrink[errors.argmin(0)].reshape(-1, 1)  # per row, the first candidate of the smallest error
    return _candidate(xmin * best, xmax * best, bits, symmetric, offset, include_zero)


def _search_errors(x2, xmin, xmax, shrink, bits, symmetric, offset, include_zero) -> torch.Tensor:
    """mean |x_hat - x|^2.4 per row of x2 [rows, n] for each candidate range [min k, max k] of `shrink` (k):
    [candidates, rows]. All candidates of a chunk at once (the same elementwise steps as quantize / dequantize)."""
    k = shrink.reshape(-1, 1, 1)
    qp = _candidate(xmin * k, xmax * k, bits, symmetric, offset, include_zero)  # scale [candidates, rows, 1]
    v = torch.round(x2 / qp.scale - offset) if offset else torch.round(x2 / qp.scale)
    if qp.zero_point is not None:
        v = (v + qp.zero_point).clamp(qp.qmin, qp.qmax) - qp.zero_point
    else:
        v = v.clamp(qp.qmin, qp.qmax)
    return ((v + offset) * qp.scale - x2).abs().pow(SEARCH_NORM).mean(-1)


def split_groups(cols: int, channels: int, split: int) -> tuple[int, int] | None:
    """The column counts of input channels [:split] and [split:] in weight rows [C_out, cols] with `channels` input
    channels (cols = channels * kernel taps), or None when `split` is 0."""
    if not split:
        return None
    if not 0 < split < channels:
        raise QuantuneError(f"a weight split at input channel {split} of {channels} leaves an empty part")
    taps = cols // channels
    return split * taps, cols - split * taps


def per_column(t: torch.Tensor | None, groups: tuple[int, ...] | None) -> torch.Tensor | None:
    """[rows, G] per-group parameters as [rows, cols] (groups: the column counts), `t` itself without groups."""
    if t is None or not groups:
        return t
    return torch.cat([t[:, i : i + 1].expand(-1, n) for i, n in enumerate(groups)], 1)  # no index tensor, no sync


def search_grouped(rows: torch.Tensor, bits: int, groups: tuple[int, ...] | None, **kwargs) -> QParams:
    """search_qparams per row for each column group of `rows` [C_out, cols] on its own: scale (and zero point)
    [C_out, G]; one group (None) is search_qparams(rows, per_channel=True)."""
    if not groups:
        return search_qparams(rows, bits, per_channel=True, **kwargs)
    parts = [search_qparams(p, bits, per_channel=True, **kwargs) for p in rows.split(list(groups), dim=1)]
    zero = None if parts[0].zero_point is None else torch.cat([p.zero_point for p in parts], 1)
    return QParams(torch.cat([p.scale for p in parts], 1), zero, bits, parts[0].offset)


def _shape(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if t.shape == x.shape:  # per element (per_column's [rows, cols])
        return t
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1))) if t.shape[0] > 1 else t.reshape(-1)[:1]


def quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Integer codes (float tensor holding integers in [qmin, qmax]); cast them to a storage dtype yourself."""
    s = _shape(qp.scale, x)
    v = torch.round(x / s - qp.offset) if qp.offset else torch.round(x / s)
    if qp.zero_point is not None:
        v = v + _shape(qp.zero_point, x)
    return v.clamp(qp.qmin, qp.qmax)


def dequantize(q: torch.Tensor, qp: QParams) -> torch.Tensor:
    v = q.float()
    if qp.zero_point is not None:
        v = v - _shape(qp.zero_point, q)
    return (v + qp.offset) * _shape(qp.scale, q)


def fake_quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Quantize-dequantize with the straight-through estimator (gradient 1 inside the range, 0 outside)."""
    s = _shape(qp.scale, x)
    v = round_ste(x / s - qp.offset) if qp.offset else round_ste(x / s)
    if qp.zero_point is not None:
        z = _shape(qp.zero_point, x)
        return (torch.clamp(v + z, qp.qmin, qp.qmax) - z + qp.offset) * s
    return (torch.clamp(v, qp.qmin, qp.qmax) + qp.offset) * s


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit codes [..., n] (values 0..15) -> uint8 [..., ceil(n / 2)]: even index low nibble, odd high."""
    c = codes.to(torch.uint8)
    if c.numel() and int(c.max()) > 15:
        raise QuantuneError("pack_int4 takes codes from 0 to 15")
    if c.shape[-1] % 2:
        c = torch.nn.functional.pad(c, (0, 1))
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_int4: uint8 [..., m] -> uint8 codes [..., n] (n = the unpadded length)."""
    out = torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)
    return out[..., :n]


def smallest_int_dtype(lo: int, hi: int) -> torch.dtype:
    """The narrowest signed integer dtype holding [lo, hi] (uint8 when lo >= 0 and hi < 256)."""
    if lo >= 0 and hi <= 255:
        return torch.uint8
    for dtype in (torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return dtype
    return torch.int64


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(|x|^2 / |x - x_hat|^2) in dB."""
    ref = reference.detach().double()
    noise = (ref - approx.detach().double()).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / noise.clamp_min(1e-30)))
