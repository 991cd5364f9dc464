"""OpenVINO export of a quantune integer model: quantune's own integers and calibrated scales as an OpenVINO graph.

OpenVINO's CPU plugin runs a layer in int8 when its graph shows the quantization explicitly (its low-precision
transformations, LPT): a FakeQuantize on the activation and a dequantization of integer weights,
    x_hat = FakeQuantize(x; lo = (0 - z_a) s_a, hi = (2^b - 1 - z_a) s_a, levels 2^b)       (uint8 on the CPU)
    W     = Multiply(Convert(W_int: int8 constant), s_w[n])                                (int8 weights)
    y     = Conv / MatMul(x_hat, W) + b
which is exactly the integer layer of quant/kernels.py (the same (s_a, z_a), W_int and s_w), so OpenVINO runs
quantune's calibration (EDA-DM, Q-Diffusion, minmax) on its own kernels; NNCF, OpenVINO's own PTQ, emits the same
pattern from its calibration. The export swaps, for the duration of the trace only (`export_view`):
- every integer layer (QuantLinear / QuantConv2d) for an `_ExportLayer`: torch.fake_quantize_per_tensor_affine on
  its input (on x / s for a SmoothQuant-ed one, whose integers are of W diag(s); a split quantizer's layer is two
  products, one per part, summed: OpenVINO would requantize a concat of the parts to one scale; a split weight
  grid, EDA-DM's reference preset, gives each part's product its own int8 constant and s_w[n]),
  and its integers as an int8 buffer dequantized in the graph. Integers beyond int8 (asymmetric 8-bit, IntLoRA
  SHIFT merges) are exported as their float weight (OpenVINO then runs that layer in float, as it would say);
  weight-only layers (W4A16) have no FakeQuantize and keep int8 weights (OpenVINO decompresses them in its
  FullyConnected kernel);
- every quantized attention's q / k / v quantizers for FakeQuantize modules and the product fused, one
  scaled_dot_product_attention on Q_hat, K_hat, V_hat: the form PyTorch's kernels deploy (quant/attention.py; P is
  not quantized). `attention="calibrated"` exports the calibrated product instead (P_hat through its quantizer,
  two MatMuls OpenVINO runs in int8) and "float" leaves the products unquantized: on the SD-1.5 UNet at 256 px
  they ran 838 / 680 / 648 ms (calibrated / fused / float) against NNCF INT8's 635 (defaults) and 683 (model_type
  TRANSFORMER), with the same SQNR against PyTorch's kernels (27.2-27.3 dB; benchmarks/openvino_export.py,
  benchmarks/results/openvino_export_256.md), hence "fused".
The view is undone when the trace ends; the model is unchanged. Traced by `openvino.convert_model` (TorchScript),
so Python control flow on shapes is fixed by the example's shapes: quant/ov_runtime.py converts once per input
signature. OpenVINO is optional (`pip install openvino`): `openvino_missing()` says why it cannot run.

Written by hand: OpenVINO's converters read FakeQuantize and int8 constants, but nothing maps quantune's integer
layers and attention quantizers onto them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging

import torch
from torch import nn

from quantune.modules import set_module
from quantune.quant.act import ActQuantizer
from quantune.quant.attention import QuantAttnProcessor, attentions
from quantune.quant.intlayer import _QuantWeight

logger = logging.getLogger(__name__)


def openvino_missing() -> str | None:
    """Why OpenVINO cannot run here (not installed), or None."""
    if importlib.util.find_spec("openvino") is None:
        return "OpenVINO is not installed (pip install openvino)"
    return None


class _ExportAct(nn.Module):
    """An ActQuantizer as FakeQuantize ops (per part when split); a smoothed one yields x / s quantized, its
    layer's weight keeps diag(s) (module docstring)."""

    def __init__(self, aq: ActQuantizer, keep_smooth: bool = False) -> None:
        super().__init__()
        self.split, self.qmax = aq.split, 2**aq.bits - 1
        self.params = [(float(aq.scale[i]), int(aq.zero_point[i])) for i in range(aq.scale.shape[0])]
        self.smooth = aq.smooth.detach().clone() if aq.smooth is not None else None
        self.keep_smooth = keep_smooth  # a standalone quantizer gives x_hat back in x's units

    def quantized_parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The FakeQuantize'd input, one tensor per part (two for a split quantizer)."""
        if self.smooth is not None:
            x = x / self.smooth
        parts = [x[:, : self.split], x[:, self.split :]] if self.split else [x]
        return [torch.fake_quantize_per_tensor_affine(p, s, z, 0, self.qmax) for p, (s, z) in zip(parts, self.params)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.quantized_parts(x)
        y = torch.cat(out, 1) if self.split else out[0]
        return y * self.smooth if self.smooth is not None and self.keep_smooth else y


class _ExportLayer(nn.Module):
    """An integer layer as OpenVINO reads it: FakeQuantize'd input, int8 weight dequantized in the graph, then the
    layer's own `product` (F.linear, F.conv2d: any registered integer layer class exports through it). A split
    weight grid is one int8 constant and scale per part (`w_int1`, `w_scale1` for the second)."""

    def __init__(self, layer: _QuantWeight) -> None:
        super().__init__()
        self._product = layer.product  # the layer's own float op (a bound method: the layer is not a submodule)
        self.act = _ExportAct(layer.act_quant) if layer.act_quant is not None else None
        w = layer.int_weight().view(layer.weight_shape)
        self.register_buffer("bias", layer.bias.detach().float().clone() if layer.bias is not None else None)
        self.split = layer.weight_split  # input channels of the first weight grid (0: one grid)
        if int(w.min()) >= -128 and int(w.max()) <= 127:
            shape = (-1,) + (1,) * (len(layer.weight_shape) - 1)
            c = self.split
            ints = [w[:, :c], w[:, c:]] if c else [w]
            self.grids = len(ints)
            for i, part in enumerate(ints):  # buffers: traced as constants, the int8 ones kept int8
                self.register_buffer(f"w_int{i or ''}", part.to(torch.int8).contiguous())
                self.register_buffer(f"w_scale{i or ''}", layer.scale[:, i].float().reshape(shape).clone())
            self.register_buffer("w_float", None)
        else:  # beyond int8 (module docstring): the float weight of the integers W diag(s)
            logger.info("%s %s: integers beyond int8, exported as float", type(layer).__name__, layer.weight_shape)
            self.grids = 0
            rows = layer.per_column(layer.scale) * w.reshape(w.shape[0], -1).float()
            self.register_buffer("w_float", rows.view(layer.weight_shape))

    def weight(self, part: int | None = None) -> torch.Tensor:
        """The dequantized weight, or the input channels of one weight grid (`part`, when the weight is split)."""
        if not self.grids:
            w = self.w_float
            return w if part is None else (w[:, : self.split] if part == 0 else w[:, self.split :])
        names = ["", "1"][: self.grids]
        parts = [getattr(self, f"w_int{n}").to(torch.float32) * getattr(self, f"w_scale{n}") for n in names]
        if part is not None:
            return parts[part]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.act is None:
            return self._product(x, self.weight(), self.bias)
        parts = self.act.quantized_parts(x)
        if not self.act.split:
            return self._product(parts[0], self.weight(), self.bias)
        # a split quantizer: two products, each on its part's uint8 codes (one scale per part, as SplitKernel),
        # where a concat of the two would be requantized to one scale by OpenVINO
        c = self.act.split
        if self.split == c:  # the weight split at the same channel: each product on its own int8 constant
            w0, w1 = self.weight(0), self.weight(1)
        else:
            w = self.weight()
            w0, w1 = w[:, :c], w[:, c:]
        return self._product(parts[0], w0, self.bias) + self._product(parts[1], w1, None)


ATTENTION = ("calibrated", "fused", "float")


class _Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@contextlib.contextmanager
def export_view(model: nn.Module, attention: str = "fused"):
    """Within the block, `model`'s integer layers and attention quantizers are their FakeQuantize forms (module
    docstring); restored on exit. `attention`: "fused" (q / k / v quantized, one SDPA: PyTorch's deployed form),
    "calibrated" (the un-fused product with P quantized, as calibrated) or "float" (the products unquantized).
    Yields the module to trace: `model`, or its export layer when `model` is itself one integer layer."""
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, not {attention!r}")
    if isinstance(model, _QuantWeight):
        yield _ExportLayer(model)
        return
    layers = {n: m for n, m in model.named_modules() if isinstance(m, _QuantWeight)}
    procs = [a.processor for a in attentions(model).values() if isinstance(a.processor, QuantAttnProcessor)]
    saved = [(p, p.fused, p.sdpa_mode, dict(p.quantizers.items())) for p in procs]
    try:
        for name, layer in layers.items():
            set_module(model, name, _ExportLayer(layer))
        for p in procs:
            p.fused, p.sdpa_mode = attention == "fused", "input"  # fp32 in the graph whatever the host's bf16
            for slot, q in list(p.quantizers.items()):
                if isinstance(q, ActQuantizer):
                    p.quantizers[slot] = _ExportAct(q, keep_smooth=True) if attention != "float" else _Identity()
        yield model
    finally:
        for name, layer in layers.items():
            set_module(model, name, layer)
        for p, fused, mode, quantizers in saved:
            p.fused, p.sdpa_mode = fused, mode
            for slot, q in quantizers.items():
                p.quantizers[slot] = q


def export_counts(model: nn.Module) -> dict[str, int]:
    """How the export maps `model`: integer layers with int8 activations, weight-only layers, quantized attentions."""
    layers = [m for m in model.modules() if isinstance(m, _QuantWeight)]
    procs = [a for a in attentions(model).values() if isinstance(a.processor, QuantAttnProcessor)]
    act = sum(1 for m in layers if m.act_quant is not None)
    return {"int8 activations": act, "weight-only": len(layers) - act, "quantized attentions": len(procs)}
