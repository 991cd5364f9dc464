"""Layers that store real integers: QuantLinear / QuantConv2d (weights) and ActQuantizer (activations).

A quantized weight is W = scale (.) ((q - zero_point) << shift), with
- q: the integer codes, stored as uint8 / int8 / int16 / int32 (the narrowest that holds them) or, for 4 bits or
  fewer, two codes per byte (`packed`, see primitives.pack_int4); `code_offset` maps a stored code back to q;
- scale: fp32 per output row [C_out, 1]; zero_point: int32 per row (None for symmetric and merged weights);
- shift: uint8 per element (None except for IntLoRA-SHIFT merges: left shifts of the integer, common 2^k factored
  into scale).
The weight's memory is the integer storage plus the scales: about b/32 of fp32 (tests/quant/test_layers.py).

Built with `from_float` (search for the scales, quantize) or `from_int` (merged integers); `dequantize()` gives
the float weight; the forward dequantizes one layer at a time and, while gradients flow, recomputes that in the
backward (torch.utils.checkpoint) so no float copy of a frozen weight is kept for autograd. Integer GEMM kernels
are the PTQ issue's; these layers are the storage and the reference forward.

ActQuantizer: one asymmetric per-tensor quantizer of a layer's input (IntLoRA section 5), calibrated by an explicit
pass (`quantune.quant.calibrate`), never inside an ordinary forward; an uncalibrated quantizer refuses to run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from quantune.errors import QuantuneError
from quantune.quant.primitives import (
    QParams,
    check_bits,
    fake_quantize,
    pack_int4,
    quantize,
    search_qparams,
    smallest_int_dtype,
    unpack_int4,
)

MAX_CALIBRATION_SAMPLES = 1 << 20


@dataclass(frozen=True)
class Storage:
    """How an integer weight is stored (see the module docstring)."""

    bits: int = 8
    packed: bool = False
    code_offset: int = 0
    qdtype: torch.dtype = torch.uint8
    zero_point: bool = True
    shift: bool = False
    act_bits: int | None = None
    act_split: int = 0


class ActQuantizer(nn.Module):
    """Asymmetric per-tensor quantizer of a layer's input; `split` > 0 gives the channels [:split] and [split:] of
    dim 1 a quantizer each (EDA-DM / q-diffusion shortcut split: concat(h, skip) parts have different ranges)."""

    def __init__(self, bits: int, search: str = "l2.4", split: int = 0) -> None:
        super().__init__()
        self.bits = check_bits(bits, "act_bits", high=16)
        self.search, self.split = search, int(split)
        parts = 2 if self.split else 1
        self.register_buffer("scale", torch.ones(parts, 1))
        self.register_buffer("zero_point", torch.zeros(parts, 1))
        self.register_buffer("calibrated", torch.tensor(False))
        self.observing = False
        self._seen: list[list[torch.Tensor]] = []

    def qparams(self, part: int = 0) -> QParams:
        return QParams(self.scale[part : part + 1], self.zero_point[part : part + 1], self.bits)

    def parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x[:, : self.split], x[:, self.split :]] if self.split else [x]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self._seen.append([_sample(p) for p in self.parts(x)])
            return x
        if not bool(self.calibrated):
            raise QuantuneError(
                "an activation quantizer is not calibrated: run quantune.quant.calibrate(model, batches) first"
            )
        out = [fake_quantize(p, self.qparams(i)) for i, p in enumerate(self.parts(x))]
        return (torch.cat(out, 1) if self.split else out[0]).to(x.dtype)

    def finish_calibration(self) -> None:
        if not self._seen:
            raise QuantuneError("calibration saw no input for an activation quantizer: the layer was never called")
        for i in range(self.scale.shape[0]):
            seen = torch.cat([s[i] for s in self._seen])
            qp = search_qparams(seen, self.bits, per_channel=False, search=self.search)
            self.scale[i].copy_(qp.scale.reshape(1))
            self.zero_point[i].copy_(qp.zero_point.reshape(1))
        self.calibrated.fill_(True)
        self.observing, self._seen = False, []

    def extra_repr(self) -> str:
        return f"bits={self.bits}, split={self.split}, calibrated={bool(self.calibrated)}"


def _sample(x: torch.Tensor) -> torch.Tensor:
    from quantune.quant.primitives import sample_values

    return sample_values(x, MAX_CALIBRATION_SAMPLES).cpu()


class _QuantWeight(nn.Module):
    """The integer weight storage shared by QuantLinear and QuantConv2d."""

    def _init_storage(self, weight_shape, st: Storage) -> None:
        self.weight_shape = tuple(weight_shape)
        self.bits, self.packed, self.code_offset = st.bits, st.packed, st.code_offset
        rows, cols = weight_shape[0], int(torch.Size(weight_shape[1:]).numel())
        self.register_buffer("qweight", torch.zeros(rows, (cols + 1) // 2 if st.packed else cols, dtype=st.qdtype))
        self.register_buffer("scale", torch.ones(rows, 1))
        self.register_buffer("zero_point", torch.zeros(rows, 1, dtype=torch.int32) if st.zero_point else None)
        self.register_buffer("shift", torch.zeros(rows, cols, dtype=torch.uint8) if st.shift else None)
        self.act_quant: ActQuantizer | None = ActQuantizer(st.act_bits, split=st.act_split) if st.act_bits else None
        self.kernel = None  # an integer kernel (quant/kernels.py: prepare_int_kernels), never saved

    @property
    def cols(self) -> int:
        return int(torch.Size(self.weight_shape[1:]).numel())

    def int_weight(self) -> torch.Tensor:
        """The integer weight (q - zero_point) << shift as int32 (int64 if the shifts need it), [C_out, cols]."""
        q = unpack_int4(self.qweight, self.cols) if self.packed else self.qweight
        w = q.to(torch.int32) + self.code_offset
        if self.zero_point is not None:
            w = w - self.zero_point
        if self.shift is not None:
            w = w.to(torch.int64) << self.shift.to(torch.int64)
        return w

    def dequantize(self) -> torch.Tensor:
        return (self.scale * self.int_weight().float()).view(self.weight_shape)

    def with_weight(self, weight: torch.Tensor, search: str = "l2.4") -> _QuantWeight:
        """A layer of this shape, bits and activation quantizer holding `weight` quantized again (the adapter
        seam's merge into an integer base: QLoRA + PTQ)."""
        merged = from_float(self, self.bits, search=search, weight=weight)
        merged.act_quant = self.act_quant
        return merged

    def weight_bytes(self) -> int:
        """Bytes of the stored weight: integers, scales, zero points, shifts."""
        return sum(
            t.numel() * t.element_size()
            for t in (self.qweight, self.scale, self.zero_point, self.shift)
            if t is not None
        )

    def _store_codes(self, codes: torch.Tensor) -> None:
        """codes: integers (any dtype), [C_out, cols]; stored packed or in self.qweight's dtype."""
        u = codes.to(torch.int32) - self.code_offset
        self.qweight.copy_(pack_int4(u) if self.packed else u.to(self.qweight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:  # keep only x for the backward: no float weight, no x_q
            return checkpoint(self._quant_run, x, use_reentrant=False)
        return self._quant_run(x)

    def _quant_run(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and not torch.is_grad_enabled() and x.device == self.kernel.device:
            return self.kernel(x)
        if self.act_quant is not None:
            x = self.act_quant(x)
        return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def spec(self) -> dict:
        """What `from_spec` needs to rebuild an empty layer of this shape (saved beside a quantized model)."""
        return {
            "class": type(self).__name__,
            "weight_shape": list(self.weight_shape),
            "bits": self.bits,
            "packed": self.packed,
            "code_offset": self.code_offset,
            "qdtype": str(self.qweight.dtype).removeprefix("torch."),
            "zero_point": self.zero_point is not None,
            "shift": self.shift is not None,
            "bias": self.bias is not None,
            "act_bits": self.act_quant.bits if self.act_quant is not None else None,
            "act_split": self.act_quant.split if self.act_quant is not None else 0,
            **self._layer_args(),
        }

    def _layer_args(self) -> dict:
        return {}


def _storage_for(bits: int, symmetric: bool, pack: bool) -> tuple[bool, int, torch.dtype]:
    """(packed, code_offset, storage dtype) of b-bit codes."""
    qmin = -(2 ** (bits - 1) - 1) if symmetric else 0
    if pack and bits <= 4:
        return True, (-(2 ** (bits - 1)) if symmetric else 0), torch.uint8
    return False, 0, (torch.int8 if symmetric else smallest_int_dtype(qmin, 2**bits - 1))


class QuantLinear(_QuantWeight):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, storage: Storage = Storage()) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_storage((out_features, in_features), storage)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bits={self.bits}, packed={self.packed}"


class QuantConv2d(_QuantWeight):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        storage: Storage = Storage(),
    ) -> None:
        super().__init__()
        if padding_mode != "zeros":
            raise QuantuneError(f"QuantConv2d supports padding_mode='zeros' only, not {padding_mode!r}")
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = pair(kernel_size), pair(stride), pair(dilation)
        self.padding = padding if isinstance(padding, str) else pair(padding)
        self.groups, self.padding_mode = groups, padding_mode
        self._init_storage((out_channels, in_channels // groups, *self.kernel_size), storage)
        self.register_buffer("bias", torch.zeros(out_channels) if bias else None)

    def _layer_args(self) -> dict:
        return {
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
        }

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        w = self.dequantize().to(x.dtype)
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, bits={self.bits}"


QUANT_CLASSES = {"QuantLinear": QuantLinear, "QuantConv2d": QuantConv2d}


def _empty_like_float(layer: nn.Module, storage: Storage) -> _QuantWeight:
    bias = layer.bias is not None
    if isinstance(layer, (nn.Linear, QuantLinear)):
        return QuantLinear(layer.in_features, layer.out_features, bias, storage)
    if isinstance(layer, (nn.Conv2d, QuantConv2d)):
        return QuantConv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
            bias,
            layer.padding_mode,
            storage,
        )
    raise QuantuneError(
        f"only nn.Linear and nn.Conv2d can be quantized, not {type(layer).__name__}: change the targets"
    )


def from_float(
    layer: nn.Module,
    bits: int,
    *,
    per_channel: bool = True,
    symmetric: bool = False,
    search: str = "l2.4",
    pack: bool = True,
    act_bits: int | None = None,
    weight: torch.Tensor | None = None,
) -> _QuantWeight:
    """Quantize a float nn.Linear / nn.Conv2d (or `weight`, for a layer of its shape) into an integer layer."""
    check_bits(bits)
    w = (layer.weight if weight is None else weight).detach().float()
    rows = w.reshape(w.shape[0], -1)
    qp = search_qparams(rows, bits, per_channel=per_channel, symmetric=symmetric, search=search)
    act = ActQuantizer(act_bits) if act_bits else None
    return from_codes(layer, quantize(rows, qp), qp, pack=pack, act_quant=act)


def from_codes(
    layer: nn.Module, codes: torch.Tensor, qp: QParams, *, pack: bool = True, act_quant: ActQuantizer | None = None
) -> _QuantWeight:
    """An integer layer shaped like float `layer` from codes [C_out, cols] in [qp.qmin, qp.qmax] and their params
    (PTQ hands over its learned rounding this way)."""
    packed, code_offset, qdtype = _storage_for(qp.bits, qp.symmetric, pack)
    act_bits, act_split = (act_quant.bits, act_quant.split) if act_quant is not None else (None, 0)
    storage = Storage(qp.bits, packed, code_offset, qdtype, not qp.symmetric, act_bits=act_bits, act_split=act_split)
    q = _empty_like_float(layer, storage)
    rows = codes.shape[0]
    with torch.no_grad():
        q.scale.copy_(qp.scale.reshape(-1, 1).expand(rows, 1))
        if qp.zero_point is not None:
            q.zero_point.copy_(qp.zero_point.reshape(-1, 1).expand(rows, 1).to(torch.int32))
        q._store_codes(codes)
        if layer.bias is not None:
            q.bias.copy_(layer.bias.detach().float())
        if act_quant is not None:
            q.act_quant.load_state_dict(act_quant.state_dict())
    return q.to(layer.weight.device if hasattr(layer, "weight") else codes.device)


def from_int(
    layer: nn.Module,
    int_weight: torch.Tensor,
    scale: torch.Tensor,
    *,
    bits: int,
    shift: torch.Tensor | None = None,
    act_quant: ActQuantizer | None = None,
    bias: torch.Tensor | None = None,
) -> _QuantWeight:
    """A layer shaped like float `layer` holding given integers [C_out, cols] with per-row `scale` (merges)."""
    lo, hi = int(int_weight.min()), int(int_weight.max())
    storage = Storage(bits, qdtype=smallest_int_dtype(min(lo, -1), hi), zero_point=False, shift=shift is not None)
    q = _empty_like_float(layer, storage)
    with torch.no_grad():
        q._store_codes(int_weight)
        q.scale.copy_(scale.reshape(-1, 1).float())
        if shift is not None:
            q.shift.copy_(shift)
        if q.bias is not None:
            q.bias.copy_((layer.bias if bias is None else bias).detach().float())
    q.act_quant = act_quant
    return q
