"""Real integer kernels for W8A8 (and W4A8, unpacked to int8) QuantLinear / QuantConv2d layers.

With static per-tensor activation parameters (s_a, z_a) from calibration and weights W = s_w[n] W_int[n, k], W_int
in int8 (symmetric 8-bit codes, or 4-bit codes minus their zero point):
    x_q = clamp(round(x / s_a) + z_a, 0, 255)                                   (uint8)
(smoothed, SmoothQuant: x_q[m, k] = clamp(round(x[m, k] / (s_k s_a)) + z_a, 0, 255), W_int the integers of W diag(s):
the same product, one division per element as before)
    y[m, n] = s_a s_w[n] (acc[m, n] - z_a sum_k W_int[n, k]) + b[n],   acc = x_q W_int^T   (int32 accumulation)
which equals the fake-quantized layer (ActQuantizer + dequantized weight) up to float summation order
(tests/quant/test_kernels.py states the SQNR).

Kernels, tried in the order of KERNELS (a list of KernelChoice: `supports(layer)` gives the reason it cannot run
the layer, or None; `build(layer)` makes the kernel); the first that supports a layer is chosen, the others'
reasons are logged at debug level, and a layer none supports keeps the dequantize-on-the-fly forward with the last
reason ("dequantized (weight-only)"):
- "onednn" (CPU builds of PyTorch with oneDNN, i.e. x86): torch.ops.onednn.qconv2d_pointwise / qlinear_pointwise,
  the kernels torch.compile's x86 int8 path uses. They take uint8 activations with their zero point and int8
  weights prepacked once (qconv_prepack / qlinear_prepack), fold the zero-point correction, scales and bias, and
  write fp32. Measured: 3x3 convs ~20x faster than im2col + GEMM on this project's CPU (docs/quantization.md).
- "int_mm" (CUDA, or CPUs without oneDNN): torch._int_mm (int8 x int8 -> int32); x_q - 128 makes the
  activations int8 and the correction uses z_a - 128; convs through im2col (F.unfold), 1x1 convs as a reshape.
Asymmetric 8-bit weights (W_int = q - z in [-255, 255]) run as W_int = (q - 128) + (128 - z): the int8 product
with q - 128 plus a row term s_a s_w[n] (128 - z[n]) sum_k (x_q[k] - z_a) (`int8_weight`, `IntKernel.offset_term`).
Neither covers weight-only layers (W4A16 / W8A16), activation bits other than 8, other integers beyond int8 (IntLoRA
W8 merges), SHIFT merges, grouped convs (`unsupported_reason`). A split activation quantizer (the shortcut
split: one (s_a, z_a) for h and one for the skip in concat(h, skip)) runs as two integer products summed
(SplitKernel), each part with its own weight grid when the weight is split too (EDA-DM's reference preset). A new
kernel is one KernelChoice added to KERNELS (`register_kernel`).

`prepare_int_kernels(model)` selects a kernel per layer for the device its weights are on; a layer moved later
(`.to()`) selects again on its next forward without gradients (quant/intlayer.py), so kernels follow the model.

Written by hand: PyTorch has the kernels, but nothing connects diffusers' layers with static calibrated scales
to them (torchao and optimum-quanto quantize activations dynamically and skip Conv2d).
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantune.errors import QuantuneError

logger = logging.getLogger(__name__)


def _is_conv(layer) -> bool:
    from quantune.quant.layers import QuantConv2d  # deferred: layers / attention / quantize import this module

    return isinstance(layer, QuantConv2d)


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv2d_pointwise")


def unsupported_reason(layer) -> str | None:
    """Why `layer` (a QuantLinear / QuantConv2d) cannot run the int8 kernels, or None when it can."""
    # deferred: layers / attention / quantize import this module
    from quantune.quant.layers import QuantConv2d, QuantLinear

    if not isinstance(layer, (QuantLinear, QuantConv2d)):
        return f"no int8 kernel for {type(layer).__name__}"
    aq = layer.act_quant
    if aq is None:
        return "weight-only"
    if aq.bits != 8:
        return f"A{aq.bits}"
    if not bool(aq.calibrated):
        return "activation quantizer not calibrated"
    if layer.shift is not None:
        return "shift merge"
    if int8_weight(layer) is None:
        return "weight integers beyond int8"
    if layer.weight_split and layer.weight_split != aq.split:
        return "weight split at another channel than its input"
    if _is_conv(layer) and (layer.groups != 1 or isinstance(layer.padding, str)):
        return "grouped conv or string padding"
    return None


def int8_weight(layer) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(W_c int8 [C_out, cols], c int32 [C_out, G] or None) with W_int = W_c + c per row (and weight grid: G = 2 for
    a split weight), or None when no such split exists. Asymmetric 8-bit codes q in [0, 255] with zero points z give
    W_int = q - z in [-255, 255]: W_c = q - 128 and c = 128 - z (the kernel adds the row term,
    IntKernel.offset_term)."""
    w = layer.int_weight()
    if int(w.min()) >= -128 and int(w.max()) <= 127:
        return w.to(torch.int8), None
    if layer.zero_point is None:
        return None
    c = 128 - layer.zero_point
    w = w - layer.per_column(c)
    if int(w.min()) < -128 or int(w.max()) > 127:
        return None
    return w.to(torch.int8), c


class IntKernel:
    """The integer forward of one layer, or of input channels [lo, hi) of it (`part`, for a split activation
    quantizer, with the part's weight grid when the weight is split too); holds the int8 weight (and its
    prepacked form), scales and bias (the first part's)."""

    def __init__(self, layer, backend: str, part: int = 0) -> None:
        self.backend, self.is_conv = backend, _is_conv(layer)
        self.device = layer.qweight.device  # the layer runs its float path on inputs elsewhere (after .to())
        aq = layer.act_quant
        self.s_a, self.z_a = float(aq.scale.reshape(-1)[part]), int(aq.zero_point.reshape(-1)[part])
        self.s_a_tensor = aq.scale.reshape(-1)[part : part + 1].float().clone()  # x / s as the fake quantizer does
        if aq.smooth is not None:  # SmoothQuant: x / (s_j s_a), the integers are of W diag(s) (quant/act.py)
            self.s_a_tensor = self.s_a_tensor * aq.smooth.float()
        w, offset = int8_weight(layer)
        w = w.view(layer.weight_shape)
        channels = w.shape[1]
        lo, hi = (0, channels) if not aq.split else ((0, aq.split) if part == 0 else (aq.split, channels))
        w = w[:, lo:hi].contiguous()  # not kept: the prepacked or transposed copy is (one int8 copy per layer)
        grid = part if layer.weight_split else 0  # the weight grid of these input channels
        self.s_w = layer.scale[:, grid].float().contiguous()
        c = offset[:, grid].float() if offset is not None else None
        self.row_offset = self.s_a * self.s_w * c if c is not None else None  # s_a s_w[n] c[n]
        self.bias = layer.bias.float() if layer.bias is not None and part == 0 else None
        self.out_features = layer.weight_shape[0]
        if self.is_conv:
            self.stride, self.padding = list(layer.stride), list(layer.padding)
            self.dilation, self.kernel_size = list(layer.dilation), layer.kernel_size
        if backend == "onednn":
            self.w_zp = torch.zeros(self.out_features, dtype=torch.int64)
            if self.is_conv:
                self.packed = torch.ops.onednn.qconv_prepack(
                    w, self.s_w, self.s_a, self.z_a, self.stride, self.padding, self.dilation, 1, None
                )
            else:
                self.packed = torch.ops.onednn.qlinear_prepack(w, None)
        else:
            w2 = w.reshape(self.out_features, -1)
            self.w_t = w2.t().contiguous()  # [K, N]
            self.correction = (self.z_a - 128) * w2.to(torch.int32).sum(1)  # z'_a sum_k W_int[n, k]
            self.out_scale = self.s_a * self.s_w

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.div(x.float(), self.s_a_tensor)  # one new buffer, then in place: five fresh temporaries were
        return q.round_().add_(self.z_a).clamp_(0, 255).to(torch.uint8)  # 2x slower (benchmarks/ptq_cpu_parts.py)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xq = self.quantize_input(x)
        y = self._onednn(xq) if self.backend == "onednn" else self._int_mm(xq)
        if self.row_offset is not None:
            y = y.add_(self.offset_term(xq))
        return y.to(x.dtype)

    def offset_term(self, xq: torch.Tensor) -> torch.Tensor:
        """s_a s_w[n] c[n] sum_k (x_q[k] - z_a) over each output's inputs (for W_int = W_c + c, int8_weight): a
        row sum for a Linear, a ones-kernel conv of the channel sums for a conv (exact: integer sums in fp32)."""
        if not self.is_conv:
            sums = xq.sum(-1, keepdim=True, dtype=torch.int32).float() - xq.shape[-1] * self.z_a
            return sums * self.row_offset
        channel_sums = (xq.sum(1, keepdim=True, dtype=torch.int32) - xq.shape[1] * self.z_a).double()
        ones = torch.ones(1, 1, *self.kernel_size, dtype=torch.float64, device=xq.device)  # fp64: no TF32 on CUDA
        sums = F.conv2d(channel_sums, ones, None, self.stride, self.padding, self.dilation)  # zero-padded: x = 0
        return sums.float() * self.row_offset.view(1, -1, 1, 1)

    def _onednn(self, xq: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            return torch.ops.onednn.qconv2d_pointwise(
                xq, self.s_a, self.z_a, self.packed, self.s_w, self.w_zp, self.bias, self.stride, self.padding,
                self.dilation, 1, 1.0, 0, torch.float32, "none", [], "",
            )  # fmt: skip
        lead = xq.shape[:-1]
        y = torch.ops.onednn.qlinear_pointwise(
            xq.reshape(-1, xq.shape[-1]), self.s_a, self.z_a, self.packed, self.s_w, self.w_zp, self.bias,
            1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
        return y.reshape(*lead, self.out_features)

    def _gemm(self, a: torch.Tensor) -> torch.Tensor:
        """a: uint8 codes [M, K] -> float [M, N] (scales, zero-point correction and bias applied)."""
        m = a.shape[0]
        a8 = (a.to(torch.int16) - 128).to(torch.int8)
        if a.is_cuda and m <= 16:  # torch._int_mm on CUDA needs M > 16
            a8 = F.pad(a8, (0, 0, 0, 17 - m))
        acc = torch._int_mm(a8, self.w_t)[:m]
        y = (acc - self.correction).float() * self.out_scale
        return y + self.bias if self.bias is not None else y

    def _int_mm(self, xq: torch.Tensor) -> torch.Tensor:
        if not self.is_conv:
            lead = xq.shape[:-1]
            return self._gemm(xq.reshape(-1, xq.shape[-1])).reshape(*lead, self.out_features)
        n, _, h, w = xq.shape
        kh, kw = self.kernel_size
        oh = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        ow = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        if (kh, kw) == (1, 1) and self.padding == [0, 0]:
            cols = xq[:, :, :: self.stride[0], :: self.stride[1]].permute(0, 2, 3, 1).reshape(n * oh * ow, -1)
        else:  # im2col on the codes, padded with the zero point (the code of x = 0)
            padded = F.pad(xq, (self.padding[1],) * 2 + (self.padding[0],) * 2, value=self.z_a)
            cols = F.unfold(padded.float(), self.kernel_size, self.dilation, 0, self.stride).to(torch.uint8)
            cols = cols.transpose(1, 2).reshape(n * oh * ow, -1)
        return self._gemm(cols).reshape(n, oh, ow, -1).permute(0, 3, 1, 2)


def fast_bf16(device: torch.device | str = "cpu") -> bool:
    """Does `device` run bf16 attention faster than fp32 (CUDA; CPUs with AMX-BF16)? With AVX512-BF16 alone (this
    project's CPU) PyTorch's flash attention ran slower in bf16 than in fp32 (4096 tokens: 323 vs 310 ms,
    benchmarks/results/ptq_cpu_parts.md)."""
    if torch.device(device).type == "cuda":
        return True
    return "amx_bf16" in cpu_flags()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo's first `flags` line; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return frozenset()


def prepare_attention(model: nn.Module, attn_dtype: str = "auto") -> int:
    """Switch every quantized attention to its deployed form: one fused SDPA on the quantized q, k, v (attention.py),
    in bf16 where the input's device runs it natively ("auto", decided per call: it follows moves), or in "fp32" /
    the input's dtype ("input")."""
    # deferred: layers / attention / quantize import this module
    from quantune.quant.attention import SDPA_MODES, QuantAttnProcessor, attentions

    if attn_dtype not in SDPA_MODES:
        raise QuantuneError(f"unknown attention dtype {attn_dtype!r}: choose auto, fp32 or input")
    n = 0
    for attn in attentions(model).values():
        proc = attn.processor
        if isinstance(proc, QuantAttnProcessor):
            proc.fused, proc.sdpa_mode = True, attn_dtype
            n += 1
    return n


class SplitKernel:
    """A layer whose input is concat(h, skip) with one activation quantizer per part: the sum of two integer
    products, y = W[:, :c] x_h + W[:, c:] x_skip (+ bias once), each with its own (s_a, z_a)."""

    def __init__(self, layer, backend: str) -> None:
        self.split, self.device = layer.act_quant.split, layer.qweight.device
        self.parts = [IntKernel(layer, backend, 0), IntKernel(layer, backend, 1)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.parts[0](x[:, : self.split]) + self.parts[1](x[:, self.split :])


@dataclass(frozen=True)
class KernelChoice:
    """One integer kernel: `supports(layer)` is None when it can run `layer`, else the reason it cannot; `build(layer)`
    makes the callable kernel (with a `device` attribute); layers it runs are counted as "{kind} ({name})"."""

    name: str
    supports: Callable[[nn.Module], str | None]
    build: Callable[[nn.Module], object]
    kind: str = "int8"


def _onednn_supports(layer) -> str | None:
    if (reason := unsupported_reason(layer)) is not None:
        return reason
    if layer.qweight.device.type != "cpu":
        return "oneDNN runs on CPU only"
    return None if onednn_available() else "no oneDNN kernels in this PyTorch build"


def _int_mm_supports(layer) -> str | None:
    if (reason := unsupported_reason(layer)) is not None:
        return reason
    if layer.qweight.device.type == "cpu":
        return None
    split = layer.act_quant.split
    taps = layer.cols // layer.weight_shape[1]  # kh * kw (1 for Linear)
    ks = [split * taps, layer.cols - split * taps] if split else [layer.cols]
    if any(k % 8 for k in ks) or layer.weight_shape[0] % 8:
        return "CUDA int_mm needs K and N multiples of 8"
    return None


def _builder(backend: str) -> Callable[[nn.Module], object]:
    def build(layer):
        return (SplitKernel if layer.act_quant.split else IntKernel)(layer, backend)

    return build


KERNELS: list[KernelChoice] = [
    KernelChoice("onednn", _onednn_supports, _builder("onednn")),
    KernelChoice("int_mm", _int_mm_supports, _builder("int_mm")),
]


def register_kernel(choice: KernelChoice, first: bool = False) -> None:
    """Add a kernel to KERNELS: tried before the others (`first`) or after them."""
    KERNELS.insert(0, choice) if first else KERNELS.append(choice)


def backends() -> tuple[str, ...]:
    return ("auto", *(k.name for k in KERNELS))


def select_kernel(layer, backend: str = "auto") -> tuple[object | None, str]:
    """(kernel or None, how the layer runs): the first of KERNELS (only `backend`'s unless "auto") that supports
    `layer`; the reasons of those that do not are logged at debug level."""
    reason = f"no kernel named {backend!r}"
    for choice in KERNELS:
        if backend != "auto" and choice.name != backend:
            continue
        reason = choice.supports(layer)
        if reason is None:
            return choice.build(layer), f"{choice.kind} ({choice.name})"
        logger.debug("%s %s: no %s kernel (%s)", type(layer).__name__, list(layer.weight_shape), choice.name, reason)
    return None, f"dequantized ({reason})"


def prepare_int_kernels(model: nn.Module, backend: str = "auto", attn_dtype: str = "auto") -> Counter:
    """Give every quantized layer of `model` that can run integer arithmetic its kernel and every quantized
    attention its fused form (in place, for inference); returns the count of layers per way of running
    ("int8 (onednn)", "dequantized (weight-only)", "attention (fused sdpa)", ...), also logged. The layers keep
    `backend` and select again for a new device after a move."""
    from quantune.quant.quantize import quant_layers  # deferred: layers / attention / quantize import this module

    if backend not in backends():
        raise QuantuneError(f"unknown integer backend {backend!r}: choose one of {', '.join(backends())}")
    if backend == "onednn" and not onednn_available():
        raise QuantuneError("this PyTorch build has no oneDNN quantized kernels: use backend 'int_mm'")
    ways: Counter = Counter()
    for layer in quant_layers(model).values():
        if backend == "onednn" and layer.qweight.device.type != "cpu":
            raise QuantuneError("the oneDNN integer kernels run on CPU only: use backend 'int_mm' on CUDA")
        ways[layer.prepare_kernel(backend)] += 1
    attns = prepare_attention(model, attn_dtype)
    if attns:
        ways["attention (fused sdpa)"] += attns
    logger.info("integer kernels: %s", ", ".join(f"{n} {k}" for k, n in sorted(ways.items())) or "no layers")
    return ways


def drop_int_kernels(model: nn.Module) -> None:
    # deferred: layers / attention / quantize import this module
    from quantune.quant.attention import QuantAttnProcessor, attentions
    from quantune.quant.quantize import quant_layers  # deferred: layers / attention / quantize import this module

    for layer in quant_layers(model).values():
        layer.drop_kernel()
    for attn in attentions(model).values():
        if isinstance(attn.processor, QuantAttnProcessor):
            attn.processor.fused = False
