"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv:2402.09353), on any adapter type.

    W' = m ⊙ (W + dW) / ||W + dW||,   m initialised to ||W||  (so training starts from the base model)

The norm is taken per output row (peft, kohya, LyCORIS's default wd_on_out; m [C_out, 1(, 1, 1)]) or per input
column (older LyCORIS files; m [1, C_in(, 1, 1)]), and dW is the adapter's: LoRA (DoRA), LoHa ("DoHa") or LoKr
("DoKr"), as LyCORIS's weight_decompose. In training the norm is a constant of the backward (the paper's section
4.3, as peft does). A strength s scales the update: W + s (W' - W) (ComfyUI's and A1111's convention; at s = 1
peft and LyCORIS agree). Forward without forming W' where the norm is per row:

    W' x - W x = (m / n - 1) ⊙ (W x) + (m / n) ⊙ (dW x),   W x = base(x) - bias

and per input column, with g = m / n on the input channels: W' x - W x = base(x ⊙ g) - base(x) + dW (x ⊙ g).
The base may be an integer layer (QDoRA): W is its dequantized weight, base(x) its integer kernel.

Files: kohya / LyCORIS "dora_scale" (m in the layouts above) beside the adapter's tensors; peft and diffusers
"lora_magnitude_vector" (per row only: [C_out] for a Linear, [1, C_out, 1, 1] for a Conv2d), beside LoRA's.
Written here because peft's DoRA wraps only its own LoRA layers on float or bitsandbytes bases.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quantune.errors import QuantuneError
from quantune.lora.adapter import AdapterLayer, AdapterModule, module_from_kohya, register_adapter

EPS = torch.finfo(torch.float32).eps  # added to the norm, as LyCORIS does (a zero row stays finite)


def weight_norm(weight: torch.Tensor, on_out: bool) -> torch.Tensor:
    """||W|| per output row (on_out) or per input column, shaped [C_out, 1, ...] or [1, C_in, ...]."""
    ones = [1] * (weight.dim() - 1)
    if on_out:
        return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(-1, *ones) + EPS
    return weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1).reshape(1, -1, *ones[1:]) + EPS


def _channels(v: torch.Tensor, like: torch.Tensor, conv: bool) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over activations (channels last for Linear, dim 1 for Conv2d)."""
    v = v.reshape(-1).to(like.dtype)
    return v.reshape(1, -1, *([1] * (like.dim() - 2))) if conv else v


class Decomposition(nn.Module):
    """The magnitude m of a decomposed adapter layer (kohya's dora_scale layout) and DoRA's forward."""

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.magnitude = nn.Parameter(magnitude.detach().float().clone())
        self.on_out = magnitude.shape[1] == 1

    def gain(self, layer: AdapterLayer, detach: bool) -> torch.Tensor:
        """m / ||W + dW||, in m's layout."""
        weight = (layer.base_weight().float() + layer.get_delta_weight().float()).reshape(layer.weight_shape)
        norm = weight_norm(weight.detach() if detach else weight, self.on_out)
        return self.magnitude / norm

    def apply(self, layer: AdapterLayer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        conv = len(layer.weight_shape) == 4
        g = self.gain(layer, detach=True)
        if self.on_out:
            bias = getattr(layer.base_layer, "bias", None)
            wx = y - _channels(bias, y, conv) if bias is not None else y
            g = _channels(g, y, conv)
            change = (g - 1) * wx + g * layer.adapter_forward(x, 1.0)
        else:
            xs = x * _channels(g, x, conv)
            change = layer.base_layer(xs) - y + layer.adapter_forward(xs, 1.0)
        return y + change * layer.multiplier

    @torch.no_grad()
    def update(self, layer: AdapterLayer) -> torch.Tensor:
        """W' - W (float32, in the base weight's shape)."""
        weight = layer.base_weight().float()
        new = (weight + layer.get_delta_weight().float().reshape(weight.shape)) * self.gain(layer, detach=False)
        return new - weight

    def wrap(self, module: AdapterModule) -> DoraModule:
        return DoraModule(module, self.magnitude.detach().clone())

    def extra_repr(self) -> str:
        return f"DoRA, norm per {'output row' if self.on_out else 'input column'}"


def decompose(layer: AdapterLayer) -> AdapterLayer:
    """Give a fresh adapter layer DoRA's decomposition, m = ||W|| per output row (peft's and kohya's)."""
    if getattr(layer, "soft", False):
        raise QuantuneError("DoRA needs a mergeable adapter: a soft conv LoRA has no weight update")
    weight = layer.base_weight().float().reshape(layer.weight_shape)
    layer.decomposition = Decomposition(weight_norm(weight, on_out=True)).to(weight.device)
    return layer


@torch.no_grad()
def restart_magnitude(layer: AdapterLayer) -> None:
    """m = ||W + dW|| of the layer's current base (a QDoRA's after its base was quantized): W' equals the base
    again. A layer without a decomposition is left as it is."""
    if layer.decomposition is not None:
        weight = (layer.base_weight().float() + layer.get_delta_weight().float()).reshape(layer.weight_shape)
        d = layer.decomposition
        d.magnitude.copy_(weight_norm(weight, d.on_out))


@register_adapter
@dataclass
class DoraModule(AdapterModule):
    """A DoRA's canonical weights: the adapter it decomposes (`inner`, any type) and the magnitude m (kohya's
    dora_scale layout: [C_out, 1(, 1, 1)] per row, [1, C_in(, 1, 1)] per column)."""

    inner: AdapterModule
    magnitude: torch.Tensor

    kind = "dora"
    kohya_suffixes = ("dora_scale",)
    wraps = True

    @property
    def label(self) -> str:
        return f"{self.inner.kind}+dora"

    @property
    def rank(self) -> int:
        return self.inner.rank

    @property
    def alpha(self) -> float:
        return self.inner.alpha

    @property
    def on_out(self) -> bool:
        return self.magnitude.shape[1] == 1

    def delta(self) -> torch.Tensor:
        raise QuantuneError(
            "a DoRA's update depends on the base weight (m (W + dW) / ||W + dW|| - W): merge it into its model with "
            "`quantune lora merge`, or apply it; it cannot be mixed or re-factored without the model"
        )

    def delta_for(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.float()
        new = w + self.inner.delta_for(w)
        return new * (self.magnitude.float() / weight_norm(new, self.on_out)) - w

    def for_shape(self, shape: tuple[int, ...]) -> DoraModule:
        return DoraModule(self.inner.for_shape(shape), self.magnitude)

    def problem_with(self, shape: tuple[int, ...]) -> str | None:
        problem = self.inner.problem_with(shape)
        if problem:
            return problem
        want = (shape[0], 1) if self.on_out else (1, shape[1])
        if tuple(self.magnitude.shape) != (*want, *([1] * (len(shape) - 2))):
            return f"dora_scale {list(self.magnitude.shape)} does not fit the layer {list(shape)}"
        return None

    def check(self, key: str) -> None:
        self.inner.check(key)
        m = self.magnitude
        if m.dim() not in (2, 4) or (m.shape[0] != 1 and m.shape[1] != 1) or any(d != 1 for d in m.shape[2:]):
            raise QuantuneError(f"{key}: dora_scale of shape {list(m.shape)} is neither [C_out, 1] nor [1, C_in]")
        if not torch.isfinite(m).all():
            raise QuantuneError(f"{key}: dora_scale has NaN or inf values: the file is broken")

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        return {**self.inner.kohya_tensors(), "dora_scale": self.magnitude}

    @classmethod
    def from_kohya(cls, tensors: dict[str, torch.Tensor], key: str) -> DoraModule:
        rest = {k: t for k, t in tensors.items() if k != "dora_scale"}
        return cls(module_from_kohya(rest, key), tensors["dora_scale"])

    @classmethod
    def from_peft(cls, inner: AdapterModule, vector: torch.Tensor) -> DoraModule:
        """peft's lora_magnitude_vector ([C_out] or [1, C_out, 1, 1]) in kohya's layout."""
        conv = vector.dim() == 4
        return cls(inner, vector.reshape(-1, 1, 1, 1) if conv else vector.reshape(-1, 1))

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        if self.inner.kind != "lora":
            raise QuantuneError(f"a {self.label} adapter has no peft / diffusers form (their DoRA is LoRA's): "
                                "write kohya or quantune")  # fmt: skip
        if not self.on_out:
            raise QuantuneError("a DoRA with its norm per input column has no peft / diffusers form (theirs is per "
                                "output row): write kohya or quantune")  # fmt: skip
        m = self.magnitude
        vector = m.reshape(1, -1, 1, 1) if m.dim() == 4 else m.reshape(-1)
        return {**self.inner.peft_tensors(), "lora_magnitude_vector": vector}

    def with_alpha(self, alpha: float) -> DoraModule:
        return DoraModule(self.inner.with_alpha(alpha), self.magnitude)

    def layer(self, base: nn.Module, multiplier: float = 1.0) -> AdapterLayer:
        layer = self.inner.layer(base, multiplier)
        layer.decomposition = Decomposition(self.magnitude).to(layer.base_weight().device).requires_grad_(False)
        return layer
