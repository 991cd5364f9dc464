"""LoRA layers: a wrapper around a frozen Linear or Conv2d that adds a low-rank update.

LoRA (Hu et al. 2021, arXiv:2106.09685): y = W x + s * B (A x), with A [r, C_in] ("down"), B [C_out, r] ("up"),
B initialised to zero so training starts from the base model, and s = alpha / r (rsLoRA: alpha / sqrt(r)).
Here s is `scale` (a buffer, or an nn.Parameter when the scale is trainable as in lora_wrapper) and `multiplier`
is the run-time strength a user sets (cloneofsimo's alpha at inference); the update is s * multiplier * B A.

Conv2d, "hard" (LoCon): A is a conv with the base kernel, stride, padding and dilation (C_in -> r), B a 1x1 conv
(r -> C_out); B * A folds into one kernel dW[o, i, kh, kw] = sum_r B[o, r] A[r, i, kh, kw], so it merges into W.
Conv2d, "soft" (lora_wrapper): two parallel convs C_in -> r (base kernel, stride, padding) -> C_out (base kernel,
stride 1, "same" padding) beside the base conv; their composition has a larger receptive field than W, so it
cannot be merged and costs latency at inference.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from quantune.errors import QuantuneError
from quantune.quant.layers import QuantConv2d, QuantLinear


class LoraLayer(nn.Module):
    """Wraps `base_layer` (kept as is, frozen) with `lora_down` (A) and `lora_up` (B)."""

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        trainable_scale: bool = False,
        init: str = "kaiming",
        conv_mode: str = "hard",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        self.soft = False
        if isinstance(base_layer, (nn.Linear, QuantLinear)):  # a QuantLinear base: QLoRA
            self.lora_down = nn.Linear(base_layer.in_features, r, bias=False)
            self.lora_up = nn.Linear(r, base_layer.out_features, bias=False)
        elif isinstance(base_layer, (nn.Conv2d, QuantConv2d)):
            conv = base_layer
            if conv.groups != 1:
                raise QuantuneError(f"LoRA on a grouped conv (groups={conv.groups}) is not supported: exclude it")
            kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, padding_mode=conv.padding_mode)
            self.lora_down = nn.Conv2d(conv.in_channels, r, conv.kernel_size, bias=False, **kw)
            if conv_mode == "soft":
                self.soft = True
                self.lora_up = nn.Conv2d(r, conv.out_channels, conv.kernel_size, padding="same", bias=False)
            else:
                self.lora_up = nn.Conv2d(r, conv.out_channels, 1, bias=False)
        else:
            raise QuantuneError(
                f"LoRA adapts nn.Linear and nn.Conv2d only, not {type(base_layer).__name__}: change the targets"
            )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        scale = torch.tensor(alpha / (math.sqrt(r) if use_rslora else r), dtype=torch.float32)
        self.trainable_scale = trainable_scale
        self.scaling = float(scale)  # mirrors the `scale` buffer; refreshed when a state_dict is loaded
        self.register_load_state_dict_post_hook(_refresh_scaling)
        if trainable_scale:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.multiplier = 1.0
        self.merged_multiplier: float | None = None  # the multiplier folded into base_layer.weight, if merged
        self.reset_parameters(init, generator)  # on the CPU in fp32 (a seeded CPU generator works for any device)
        w = base_layer.scale if self.quantized_base else base_layer.weight
        self.lora_down.to(device=w.device, dtype=w.dtype)
        self.lora_up.to(device=w.device, dtype=w.dtype)

    @property
    def quantized_base(self) -> bool:
        return isinstance(self.base_layer, (QuantLinear, QuantConv2d))

    @property
    def weight_shape(self) -> tuple[int, ...]:
        b = self.base_layer
        return tuple(b.weight_shape) if self.quantized_base else tuple(b.weight.shape)

    def reset_parameters(self, init: str = "kaiming", generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            if init == "gaussian":
                self.lora_down.weight.normal_(0.0, 1.0 / self.r, generator=generator)
            else:  # peft / nn.Linear default: kaiming-uniform with a = sqrt(5)
                fan_in = self.lora_down.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                self.lora_down.weight.uniform_(-bound, bound, generator=generator)
            self.lora_up.weight.zero_()

    @property
    def merged(self) -> bool:
        return self.merged_multiplier is not None

    @property
    def alpha(self) -> float:
        """The alpha with scale = alpha / r that every file format stores (rsLoRA and trainable scales included)."""
        return float(self.scale.detach()) * self.r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged or self.multiplier == 0.0:
            return y
        scale = self.scale if self.trainable_scale else self.scaling  # a python float: no tensor op per call
        return y + self.lora_up(self.lora_down(self.dropout(x))) * (scale * self.multiplier)

    def get_delta_weight(self) -> torch.Tensor:
        """s * B A in the base weight's shape (float32 computation, returned in the base dtype)."""
        if self.soft:
            raise QuantuneError("a soft conv LoRA has no weight delta (it cannot be merged): use conv_mode='hard'")
        up = self.lora_up.weight.float().flatten(1)  # [out, r]
        down = self.lora_down.weight.float().flatten(1)  # [r, in * kh * kw]
        delta = (up @ down).view(self.weight_shape) * self.scale.float()
        return delta if self.quantized_base else delta.to(self.base_layer.weight.dtype)

    def merge(self, safe: bool = True) -> None:
        """Fold multiplier * s * B A into the base weight; with safe=True refuse a delta with NaN or inf."""
        if self.merged:
            return
        if self.quantized_base:
            raise QuantuneError(
                "a LoRA on a quantized base cannot be merged in place: `quantune qlora merge RUN_DIR --out DIR` "
                "dequantizes, adds and re-quantizes"
            )
        delta = self.get_delta_weight() * self.multiplier
        if safe and not torch.isfinite(delta).all():
            raise QuantuneError("the LoRA delta has NaN or inf values: refusing to merge (the adapter is broken)")
        with torch.no_grad():
            self.base_layer.weight.add_(delta)
        self.merged_multiplier = self.multiplier

    def unmerge(self) -> None:
        if not self.merged:
            return
        with torch.no_grad():
            self.base_layer.weight.sub_(self.get_delta_weight() * self.merged_multiplier)
        self.merged_multiplier = None

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={float(self.scale):.4g}, soft={self.soft}"


def _refresh_scaling(module: LoraLayer, incompatible_keys) -> None:
    module.scaling = float(module.scale.detach())
