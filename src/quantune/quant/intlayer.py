"""The integer layer base (`IntLayer`), its storage description and the registry of integer layer classes.

A quantized weight is W = scale (.) ((q - zero_point) << shift), with
- q: the integer codes, stored as uint8 / int8 / int16 / int32 (the narrowest that holds them) or, for 4 bits or
  fewer, two codes per byte (`packed`, see primitives.pack_int4); `code_offset` maps a stored code back to q;
- scale: fp32 per output row [C_out, 1]; zero_point: int32 per row (None for symmetric and merged weights); with
  `weight_split` = c > 0 (the shortcut split of a weight whose input is concat(h, skip), EDA-DM / Q-Diffusion) one
  of each per row for input channels [:c] and another for [c:]: [C_out, 2];
- shift: uint8 per element (None except for IntLoRA-SHIFT merges: left shifts of the integer, common 2^k factored
  into scale; IntLoRA, Guo et al. 2024, arXiv 2410.21759).
The weight's memory is the integer storage plus the scales: about b/32 of fp32 (tests/quant/test_layers.py).

The forward dequantizes one layer at a time and, while gradients flow, recomputes that in the backward
(torch.utils.checkpoint) so no float copy of a frozen weight is kept for autograd. Without gradients, a layer
prepared for integer kernels (quant/kernels.py: prepare_int_kernels) runs its kernel; after a move (`.to()`, which
goes through `_apply`) or a state-dict load the kernel is dropped and selected again, for the new device, on the
next forward without gradients.

Registry: an integer layer class owns its saved spec (`spec()` / `from_spec(spec)`, written to quantune_quant.json by
quant/quantize.py) and says which float modules it replaces (`float_types`, `args_of(layer)`); `@register_int_layer`
adds it to INT_LAYERS, which `quantize_`, `from_codes` / `from_int` and the loader look classes up in. A new integer
layer is one IntLayer subclass with `_run`, `product`, `args_of`, `_args_from_spec` (and `_layer_spec` for shape
arguments beyond the weight's shape and the bias), decorated with `@register_int_layer` (quant/layers.py has the
two built-in ones). See docs/intlora.md and docs/quantization.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from quantune.quant import kernels
from quantune.quant.act import ActQuantizer
from quantune.quant.primitives import pack_int4, per_column, split_groups, unpack_int4
from quantune.quant.train_kernels import IntegerForward, integer_training_kernel


@dataclass(frozen=True)
class Storage:
    """How an integer weight is stored (see the module docstring) and the input quantizer it carries."""

    bits: int = 8
    packed: bool = False
    code_offset: int = 0
    qdtype: torch.dtype = torch.uint8
    zero_point: bool = True
    shift: bool = False
    act_bits: int | None = None
    act_split: int = 0
    act_smooth: int = 0  # SmoothQuant: the smoothed input channels (0: none)
    weight_split: int = 0  # input channels of the first weight grid (0: one grid per row)

    def to_spec(self) -> dict:
        return {
            "bits": self.bits,
            "packed": self.packed,
            "code_offset": self.code_offset,
            "qdtype": str(self.qdtype).removeprefix("torch."),
            "zero_point": self.zero_point,
            "shift": self.shift,
            "act_bits": self.act_bits,
            "act_split": self.act_split,
            "act_smooth": self.act_smooth,
            "weight_split": self.weight_split,
        }

    @classmethod
    def from_spec(cls, spec: dict) -> Storage:
        return cls(spec["bits"], spec["packed"], spec["code_offset"], getattr(torch, spec["qdtype"]),
                   spec["zero_point"], spec["shift"], spec["act_bits"], spec.get("act_split", 0),
                   spec.get("act_smooth", 0), spec.get("weight_split", 0))  # fmt: skip


class _QuantWeight(nn.Module):
    """The integer weight storage, spec and forward shared by every integer layer class (public name: IntLayer)."""

    float_types: ClassVar[tuple[type, ...]] = ()  # the float modules this class replaces

    def _init_storage(self, weight_shape, st: Storage) -> None:
        self.weight_shape = tuple(weight_shape)
        self.bits, self.packed, self.code_offset = st.bits, st.packed, st.code_offset
        rows, cols = weight_shape[0], int(torch.Size(weight_shape[1:]).numel())
        self.weight_split = st.weight_split
        self.weight_groups = split_groups(cols, self.weight_shape[1], st.weight_split)  # column counts, or None
        g = 2 if st.weight_split else 1
        self.register_buffer("qweight", torch.zeros(rows, (cols + 1) // 2 if st.packed else cols, dtype=st.qdtype))
        self.register_buffer("scale", torch.ones(rows, g))
        self.register_buffer("zero_point", torch.zeros(rows, g, dtype=torch.int32) if st.zero_point else None)
        self.register_buffer("shift", torch.zeros(rows, cols, dtype=torch.uint8) if st.shift else None)
        self.act_quant: ActQuantizer | None = (
            ActQuantizer(st.act_bits, split=st.act_split, smooth=st.act_smooth) if st.act_bits else None
        )
        self.kernel = None  # the integer kernel selected for the weight's device (quant/kernels.py), never saved
        self.kernel_backend: str | None = None  # None: no kernel wanted (set by kernels.prepare_int_kernels)
        self._kernel_device: torch.device | None = None  # where `kernel` was selected; None: select again
        self.backward_dtype = torch.float32  # of the input gradient's product in training (quant/train_kernels.py)

    # -- the weight ----------------------------------------------------------------------------------------------
    @property
    def cols(self) -> int:
        return int(torch.Size(self.weight_shape[1:]).numel())

    def int_weight(self) -> torch.Tensor:
        """The integer weight (q - zero_point) << shift as int32 (int64 if the shifts need it), [C_out, cols]."""
        q = unpack_int4(self.qweight, self.cols) if self.packed else self.qweight
        w = q.to(torch.int32) + self.code_offset
        if self.zero_point is not None:
            w = w - self.per_column(self.zero_point)
        if self.shift is not None:
            w = w.to(torch.int64) << self.shift.to(torch.int64)
        return w

    def dequantize(self) -> torch.Tensor:
        """The float weight W. Smoothed (SmoothQuant, quant/act.py): the integers are of W diag(s), s divided out."""
        w = self.per_column(self.scale) * self.int_weight().float()
        smooth = self.smoothing()
        return (w / smooth if smooth is not None else w).view(self.weight_shape)

    def dequantize_as(self, dtype: torch.dtype) -> torch.Tensor:
        """W in `dtype`, converted from the stored codes without an int32 or fp32 copy of the whole weight (the
        integers q + offset - z are exact in bf16 up to 256); equal to `dequantize()` in fp32."""
        narrow = self.qweight.dtype in (torch.uint8, torch.int8) and self.shift is None
        if not narrow or self.smoothing() is not None or dtype not in (torch.float32, torch.bfloat16):
            return self.dequantize().to(dtype)
        q = unpack_int4(self.qweight, self.cols) if self.packed else self.qweight
        w = q.to(dtype)
        if self.code_offset:
            w.add_(self.code_offset)
        if self.zero_point is not None:
            w.sub_(self.per_column(self.zero_point).to(dtype))
        return w.mul_(self.per_column(self.scale).to(dtype)).view(self.weight_shape)

    def per_column(self, t: torch.Tensor) -> torch.Tensor:
        """A per-row, per-grid parameter ([C_out, 1] or, split, [C_out, 2]) as it applies to the columns."""
        return per_column(t, self.weight_groups)

    def smoothing(self) -> torch.Tensor | None:
        """SmoothQuant's s [cols] (its input quantizer's), or None."""
        return self.act_quant.smooth if self.act_quant is not None else None

    def with_weight(self, weight: torch.Tensor, search: str = "l2.4", per_channel: bool = True) -> _QuantWeight:
        """A layer of this shape, bits, grid (symmetric when it stores no zero point), packing and activation
        quantizer holding `weight` quantized again (the adapter seam's merge into an integer base: QLoRA + PTQ);
        `per_channel` False: one scale for the whole tensor (the coarsest re-quantization)."""
        from quantune.quant.layers import from_float  # layers.py subclasses this module's IntLayer

        symmetric = self.zero_point is None
        smooth = self.smoothing()
        weight = weight * smooth.view(1, -1) if smooth is not None else weight  # the integers are of W diag(s)
        grid = {"per_channel": per_channel, "symmetric": symmetric, "pack": self.packed, "search": search}
        merged = from_float(self, self.bits, weight=weight, split=self.weight_split if per_channel else 0, **grid)
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

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:  # keep only x for the backward: no float weight, no x_q
            kernel = integer_training_kernel(self)
            if kernel is not None and x.device == kernel.device:  # a frozen base: the integer kernel forward
                return IntegerForward.apply(x, self, kernel)
            return checkpoint(self._quant_run, x, use_reentrant=False)
        return self._quant_run(x)

    def input_grad(self, grad: torch.Tensor, weight: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
        """dL/dx of `product(x, weight, None)` for the output gradient `grad` (quant/train_kernels.py); by autograd
        here, a closed form in the layers that have one."""
        with torch.enable_grad():
            x = torch.zeros(x_shape, dtype=grad.dtype, device=grad.device, requires_grad=True)
            (out,) = torch.autograd.grad(self.product(x, weight, None), x, grad)
        return out

    def _quant_run(self, x: torch.Tensor) -> torch.Tensor:
        observing = self.act_quant is not None and self.act_quant.observing  # calibration sees the float input
        if self.kernel_backend is not None and not torch.is_grad_enabled() and not observing:
            kernel = self.current_kernel()
            if kernel is not None and x.device == kernel.device:
                return kernel(x)
        if self.act_quant is not None:
            x = self.act_quant(x)
        return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def product(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer's float operation on input `x` with `weight` (its shape) and `bias`: what `_run` applies to
        the dequantized weight, and what the OpenVINO export traces on int8 constants (quant/ov_export.py)."""
        raise NotImplementedError

    # -- integer kernels (quant/kernels.py) ----------------------------------------------------------------------
    def prepare_kernel(self, backend: str = "auto") -> str:
        """Select this layer's kernel now, for the device its weight is on, and keep selecting it for `backend`
        after moves; returns how the layer runs ("int8 (onednn)", "dequantized (weight-only)", ...)."""
        self.kernel_backend = backend
        self.kernel, way = kernels.select_kernel(self, backend)
        self._kernel_device = self.qweight.device
        self._kernel_act = self._act_state()
        return way

    def _act_state(self) -> tuple | None:
        """Which activation-quantizer tensors the kernel was built from (it holds (s_a, z_a) as numbers): a
        calibration, a resume or a DDP buffer broadcast that changes them builds it again."""
        aq = self.act_quant
        if aq is None:
            return None
        return tuple((t.data_ptr(), t._version) for t in (aq.scale, aq.zero_point))

    def current_kernel(self):
        """The kernel for the weight's current device and activation scales, selected again when either changed
        since (a move; a calibration or resume)."""
        if self._kernel_device != self.qweight.device or self._kernel_act != self._act_state():
            self.prepare_kernel(self.kernel_backend)
        return self.kernel

    def drop_kernel(self) -> None:
        self.kernel, self.kernel_backend, self._kernel_device = None, None, None

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        self.kernel, self._kernel_device = None, None  # stale after .to() / .half(): selected again when run
        return out

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.kernel, self._kernel_device = None, None  # new integers or scales: the kernel is rebuilt when run

    # -- spec and construction (the registry) --------------------------------------------------------------------
    def storage(self) -> Storage:
        aq = self.act_quant
        act_bits, act_split, smooth = (aq.bits, aq.split, aq.channels) if aq is not None else (None, 0, 0)
        return Storage(self.bits, self.packed, self.code_offset, self.qweight.dtype, self.zero_point is not None,
                       self.shift is not None, act_bits, act_split, smooth, self.weight_split)  # fmt: skip

    def spec(self) -> dict:
        """What `from_spec` needs to rebuild an empty layer of this shape (saved beside a quantized model)."""
        return {"class": type(self).__name__, "weight_shape": list(self.weight_shape), **self.storage().to_spec(),
                "bias": self.bias is not None, **self._layer_spec()}  # fmt: skip

    def _layer_spec(self) -> dict:
        return {}

    @classmethod
    def from_spec(cls, spec: dict) -> _QuantWeight:
        """An empty layer (zeros) of the class, shape and storage a `spec()` describes."""
        return cls(**cls._args_from_spec(spec), storage=Storage.from_spec(spec))

    @classmethod
    def _args_from_spec(cls, spec: dict) -> dict:
        raise NotImplementedError

    @classmethod
    def args_of(cls, layer: nn.Module) -> dict:
        """Constructor arguments (all but storage) of an integer layer shaped like `layer` (float or integer)."""
        raise NotImplementedError

    @classmethod
    def like(cls, layer: nn.Module, storage: Storage) -> _QuantWeight:
        return cls(**cls.args_of(layer), storage=storage)


IntLayer = _QuantWeight
INT_LAYERS: dict[str, type[_QuantWeight]] = {}
QUANT_CLASSES = INT_LAYERS  # the spec loader's name for it


def register_int_layer(cls: type[_QuantWeight]) -> type[_QuantWeight]:
    """Class decorator: `cls` is saved and loaded under its name and replaces its `float_types`."""
    INT_LAYERS[cls.__name__] = cls
    return cls


def int_layer_class(layer: nn.Module) -> type[_QuantWeight] | None:
    """The registered integer class for float or integer `layer`, or None; the most specific one (the class whose
    own or replaced type comes first in type(layer)'s MRO), so a class for a subclass of nn.Linear wins."""
    for klass in type(layer).__mro__:
        for cls in INT_LAYERS.values():
            if klass is cls or klass in cls.float_types:
                return cls
    return None


def quantizable(module: nn.Module) -> bool:
    """Is `module` a float layer some registered integer class replaces?"""
    return any(isinstance(module, cls.float_types) for cls in INT_LAYERS.values())


def quantizable_names() -> str:
    """'nn.Linear and nn.Conv2d': the float layers the registered classes replace, for error messages."""
    names = [f"nn.{t.__name__}" for cls in INT_LAYERS.values() for t in cls.float_types]
    return ", ".join(names[:-1]) + (" and " if len(names) > 1 else "") + names[-1]


def layer_from_spec(spec: dict) -> _QuantWeight | None:
    """An empty integer layer from its spec, or None when no registered class has the spec's name."""
    cls = INT_LAYERS.get(spec.get("class"))
    return cls.from_spec(spec) if cls is not None else None
