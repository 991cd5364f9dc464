"""The built-in integer layers, QuantLinear and QuantConv2d, and the ways to build one.

Each stores W = scale (.) ((q - zero_point) << shift) as real integers (quant/intlayer.py says how, and how an
integer layer class is registered). Built with
- `quantize_layer(layer, WeightQuant, ActQuant | None)` or its keyword spelling `from_float`: search the scales
  (L2.4 or min-max, quant/primitives.py), round to nearest;
- `from_codes(layer, codes, qparams)`: given codes (PTQ's learned rounding, ptq/wrap.py);
- `from_int(layer, integers, scale)`: merged integers (IntLoRA's merge, quant/intlora.py).
`dequantize()` gives the float weight. ActQuantizer (quant/act.py) is re-exported here. See docs/intlora.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantune.errors import QuantuneError
from quantune.quant.act import MAX_CALIBRATION_SAMPLES, ActQuantizer
from quantune.quant.config import ActQuant, WeightQuant
from quantune.quant.intlayer import (
    INT_LAYERS,
    QUANT_CLASSES,
    IntLayer,
    Storage,
    _QuantWeight,
    int_layer_class,
    layer_from_spec,
    quantizable,
    quantizable_names,
    register_int_layer,
)
from quantune.quant.primitives import (
    QParams,
    per_column,
    quantize,
    search_grouped,
    search_qparams,
    smallest_int_dtype,
    split_groups,
)

__all__ = [
    "INT_LAYERS",
    "MAX_CALIBRATION_SAMPLES",
    "QUANT_CLASSES",
    "ActQuantizer",
    "IntLayer",
    "QuantConv2d",
    "QuantLinear",
    "Storage",
    "_QuantWeight",
    "from_codes",
    "from_float",
    "from_int",
    "int_layer_class",
    "layer_from_spec",
    "quantizable",
    "quantize_layer",
    "register_int_layer",
]


def _bias(layer: nn.Module) -> bool:
    return layer.bias is not None


@register_int_layer
class QuantLinear(_QuantWeight):
    float_types = (nn.Linear,)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, storage: Storage = Storage()) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_storage((out_features, in_features), storage)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def args_of(cls, layer: nn.Module) -> dict:
        return {"in_features": layer.in_features, "out_features": layer.out_features, "bias": _bias(layer)}

    @classmethod
    def _args_from_spec(cls, spec: dict) -> dict:
        shape = spec["weight_shape"]
        return {"in_features": shape[1], "out_features": shape[0], "bias": spec["bias"]}

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return self.product(x, self.dequantize().to(x.dtype), bias)

    def product(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def input_grad(self, grad: torch.Tensor, weight: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
        return grad @ weight

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bits={self.bits}, packed={self.packed}"


@register_int_layer
class QuantConv2d(_QuantWeight):
    float_types = (nn.Conv2d,)

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

    @classmethod
    def args_of(cls, layer: nn.Module) -> dict:
        names = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")
        return {**{n: getattr(layer, n) for n in names}, "bias": _bias(layer), "padding_mode": layer.padding_mode}

    def _layer_spec(self) -> dict:
        return {
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
        }

    @classmethod
    def _args_from_spec(cls, spec: dict) -> dict:
        shape, groups = spec["weight_shape"], spec["groups"]
        return {"in_channels": shape[1] * groups, "out_channels": shape[0], "kernel_size": tuple(shape[2:]),
                "stride": spec["stride"], "padding": spec["padding"], "dilation": spec["dilation"], "groups": groups,
                "bias": spec["bias"]}  # fmt: skip

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return self.product(x, self.dequantize().to(x.dtype), bias)

    def product(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def input_grad(self, grad: torch.Tensor, weight: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
        return torch.nn.grad.conv2d_input(x_shape, weight, grad, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, bits={self.bits}"


def _empty_like_float(layer: nn.Module, storage: Storage) -> _QuantWeight:
    cls = int_layer_class(layer)
    if cls is None:
        raise QuantuneError(
            f"only {quantizable_names()} can be quantized, not {type(layer).__name__}: change the targets"
        )
    return cls.like(layer, storage)


def _storage_for(bits: int, symmetric: bool, pack: bool) -> tuple[bool, int, torch.dtype]:
    """(packed, code_offset, storage dtype) of b-bit codes."""
    qmin = -(2 ** (bits - 1) - 1) if symmetric else 0
    if pack and bits <= 4:
        return True, (-(2 ** (bits - 1)) if symmetric else 0), torch.uint8
    return False, 0, (torch.int8 if symmetric else smallest_int_dtype(qmin, 2**bits - 1))


def quantize_layer(
    layer: nn.Module, weight: WeightQuant, act: ActQuant | None = None, *, tensor: torch.Tensor | None = None,
    split: int = 0,
) -> _QuantWeight:  # fmt: skip
    """Quantize a float layer (or `tensor`, a weight for a layer of its shape) into its integer layer; `act`: an
    (uncalibrated) input quantizer; `split` > 0 (per channel only): a grid for input channels [:split] and one for
    the rest, and an input quantizer split there too (the shortcut split, quant/intlayer.py)."""
    w = (layer.weight if tensor is None else tensor).detach().float()
    rows = w.reshape(w.shape[0], -1)
    kwargs = {"symmetric": weight.symmetric, "search": weight.search}
    if split and weight.per_channel:
        shape = getattr(layer, "weight_shape", None) or tuple(layer.weight.shape)  # an integer or a float layer
        groups = split_groups(rows.shape[1], shape[1], split)
        qp = search_grouped(rows, weight.bits, groups, **kwargs)
        codes = quantize(rows, QParams(per_column(qp.scale, groups), per_column(qp.zero_point, groups), qp.bits))
    else:
        split = 0
        qp = search_qparams(rows, weight.bits, per_channel=weight.per_channel, **kwargs)
        codes = quantize(rows, qp)
    aq = ActQuantizer(act.bits, act.search, split=split) if act is not None else None
    return from_codes(layer, codes, qp, pack=weight.pack, act_quant=aq, weight_split=split)


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
    split: int = 0,
) -> _QuantWeight:
    """`quantize_layer` spelled with keywords: WeightQuant(bits, per_channel, symmetric, search, pack) and, when
    `act_bits`, an L2.4 ActQuant(act_bits)."""
    wq = WeightQuant(bits, per_channel, symmetric, search, pack)
    return quantize_layer(layer, wq, ActQuant(act_bits) if act_bits else None, tensor=weight, split=split)


def from_codes(
    layer: nn.Module, codes: torch.Tensor, qp: QParams, *, pack: bool = True, act_quant: ActQuantizer | None = None,
    weight_split: int = 0,
) -> _QuantWeight:  # fmt: skip
    """An integer layer shaped like float `layer` from codes [C_out, cols] in [qp.qmin, qp.qmax] and their params
    (PTQ hands over its learned rounding this way); `weight_split` > 0: qp holds [C_out, 2], one grid per part."""
    packed, code_offset, qdtype = _storage_for(qp.bits, qp.symmetric, pack)
    aq = act_quant
    act_bits, act_split, smooth = (aq.bits, aq.split, aq.channels) if aq is not None else (None, 0, 0)
    storage = Storage(qp.bits, packed, code_offset, qdtype, not qp.symmetric, act_bits=act_bits, act_split=act_split,
                      act_smooth=smooth, weight_split=weight_split)  # fmt: skip
    q = _empty_like_float(layer, storage)
    rows, g = codes.shape[0], q.scale.shape[1]
    with torch.no_grad():
        q.scale.copy_(qp.scale.reshape(-1, g).expand(rows, g))
        if qp.zero_point is not None:
            q.zero_point.copy_(qp.zero_point.reshape(-1, g).expand(rows, g).to(torch.int32))
        q._store_codes(codes)
        if layer.bias is not None:
            q.bias.copy_(layer.bias.detach().float())
        if act_quant is not None:
            q.act_quant.load_state_dict(act_quant.state_dict())
            q.act_quant.search = act_quant.search
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
    with torch.device(int_weight.device):  # built where the integers are (a training step's layer: on its device)
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
