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
from dataclasses import dataclass

import torch
from torch import nn

from quantune.errors import QuantuneError
from quantune.lora.adapter import AdapterLayer, AdapterModule, register_adapter
from quantune.lora.bases import reference_tensor


class LoraLayer(AdapterLayer):
    """Wraps `base_layer` (kept as is, frozen; float or integer, lora/bases.py) with `lora_down` (A) and
    `lora_up` (B)."""

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
        super().__init__(base_layer)
        self.r = r
        self.soft = False
        if self.base_kind == "linear":
            self.lora_down = nn.Linear(base_layer.in_features, r, bias=False)
            self.lora_up = nn.Linear(r, base_layer.out_features, bias=False)
        else:
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
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        scale = torch.tensor(alpha / (math.sqrt(r) if use_rslora else r), dtype=torch.float32)
        self.trainable_scale = trainable_scale
        self.scaling = float(scale)  # mirrors the `scale` buffer; refreshed when a state_dict is loaded
        self.register_load_state_dict_post_hook(_refresh_scaling)
        if trainable_scale:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.reset_parameters(init, generator)  # on the CPU in fp32 (a seeded CPU generator works for any device)
        w = reference_tensor(base_layer)
        self.lora_down.to(device=w.device, dtype=w.dtype)
        self.lora_up.to(device=w.device, dtype=w.dtype)

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
    def alpha(self) -> float:
        """The alpha with scale = alpha / r that every file format stores (rsLoRA and trainable scales included)."""
        return float(self.scale.detach()) * self.r

    def adapter_forward(self, x: torch.Tensor, multiplier: float) -> torch.Tensor:
        scale = self.scale if self.trainable_scale else self.scaling  # a python float: no tensor op per call
        return self.lora_up(self.lora_down(self.dropout(x))) * (scale * multiplier)

    def get_delta_weight(self) -> torch.Tensor:
        """s * B A in the base weight's shape (float32 computation, returned in the base dtype)."""
        if self.soft:
            raise QuantuneError("a soft conv LoRA has no weight delta (it cannot be merged): use conv_mode='hard'")
        up = self.lora_up.weight.float().flatten(1)  # [out, r]
        down = self.lora_down.weight.float().flatten(1)  # [r, in * kh * kw]
        delta = (up @ down).view(self.weight_shape) * self.scale.float()
        return delta if self.quantized_base else delta.to(self.base_layer.weight.dtype)

    def adapter_module(self) -> LoraModule:
        return LoraModule(self.lora_down.weight.detach().clone(), self.lora_up.weight.detach().clone(), self.alpha,
                          self.soft)  # fmt: skip

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={float(self.scale):.4g}, soft={self.soft}"


def _refresh_scaling(module: LoraLayer, incompatible_keys) -> None:
    module.scaling = float(module.scale.detach())


@register_adapter
@dataclass
class LoraModule(AdapterModule):
    """LoRA's canonical weights: down A [r, C_in] or [r, C_in, kh, kw], up B [C_out, r] or [C_out, r, 1, 1] (a soft
    conv's up is [C_out, r, kh, kw]), and alpha, normalised so that the update is (alpha / r) B A for every source
    (rsLoRA and trainable scales are converted on the way in)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    soft: bool = False

    kind = "lora"
    kohya_suffixes = ("lora_down.weight", "lora_up.weight", "alpha")

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """(alpha / r) * B A, in float32, shaped as the base weight ([out, in] or [out, in, kh, kw])."""
        if self.soft:
            raise QuantuneError("a soft conv LoRA has no weight delta: it cannot be merged, mixed or converted")
        up, down = self.up.float().flatten(1), self.down.float().flatten(1)
        return (up @ down).view(self.up.shape[0], *self.down.shape[1:]) * self.scale

    def for_shape(self, shape: tuple[int, ...]) -> LoraModule:
        """Flat factors (down [r, C_in * kh * kw], up [C_out, r], as an SVD of a flat conv update gives them) shaped
        as LoCon's for a conv base of `shape`; any other module is returned as it is."""
        flat = self.down.dim() == 2 and self.up.dim() == 2 and len(shape) == 4 and not self.soft
        if not (flat and self.up.shape[0] == shape[0] and self.down.shape[1] == math.prod(shape[1:])):
            return self
        down = self.down.reshape(self.rank, *shape[1:])
        return LoraModule(down, self.up.reshape(*self.up.shape, 1, 1), self.alpha)

    def problem_with(self, shape: tuple[int, ...]) -> str | None:
        ok = self.down.shape[1] == shape[1] and self.up.shape[0] == shape[0] and self.up.shape[1] == self.rank
        if len(shape) == 4:
            ok = ok and self.down.dim() == 4 and tuple(self.down.shape[2:]) == tuple(shape[2:]) and self.up.dim() == 4
        else:
            ok = ok and self.down.dim() == 2 and self.up.dim() == 2
        if ok:
            return None
        return f"down {list(self.down.shape)}, up {list(self.up.shape)} do not fit the model's layer {list(shape)}"

    def check(self, key: str) -> None:
        if self.down.dim() not in (2, 4) or self.up.dim() != self.down.dim() or self.up.shape[1] != self.rank:
            raise QuantuneError(
                f"{key}: the LoRA's factors contradict each other (down {list(self.down.shape)}, up "
                f"{list(self.up.shape)}: the up factor's second dimension must be the rank): the file is broken"
            )
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise QuantuneError(f"{key}: alpha = {self.alpha} must be a finite number > 0: the file is broken")

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_down.weight": self.down, "lora_up.weight": self.up,
                "alpha": torch.tensor(self.alpha, dtype=torch.float32)}  # fmt: skip

    @classmethod
    def from_kohya(cls, tensors: dict[str, torch.Tensor], key: str) -> LoraModule:
        if "lora_up.weight" not in tensors:
            raise QuantuneError(f"{key} has a lora_down but no lora_up weight: the file is incomplete")
        down = tensors["lora_down.weight"]
        alpha = float(tensors["alpha"]) if "alpha" in tensors else float(down.shape[0])  # no alpha: scale 1
        return cls(down=down, up=tensors["lora_up.weight"], alpha=alpha)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        if self.soft:
            raise QuantuneError(
                "a soft conv LoRA (lora_wrapper) has no peft / diffusers form: write the quantune format"
            )
        return {"lora_A.weight": self.down, "lora_B.weight": self.up}

    def with_alpha(self, alpha: float) -> LoraModule:
        """alpha' with B' = B * alpha / alpha': the update (alpha' / r) B' A is unchanged (bit-exact when equal)."""
        if alpha == self.alpha:
            return self
        return LoraModule(self.down, (self.up.float() * (self.alpha / alpha)).to(self.up.dtype), alpha, self.soft)

    @classmethod
    def new_layer(cls, base: nn.Module, rank: int, alpha: float, config, generator=None) -> LoraLayer:
        return LoraLayer(base, rank, alpha, dropout=config.dropout, use_rslora=config.use_rslora,
                         trainable_scale=config.trainable_scale, init=config.init, conv_mode=config.conv_mode,
                         generator=generator)  # fmt: skip

    def layer(self, base: nn.Module, multiplier: float = 1.0) -> LoraLayer:
        layer = LoraLayer(base, self.rank, self.alpha, conv_mode="soft" if self.soft else "hard")
        with torch.no_grad():
            layer.lora_down.weight.copy_(self.down)
            layer.lora_up.weight.copy_(self.up)
        layer.multiplier = multiplier
        return layer.requires_grad_(False)
