"""IntLoRA: integral low-rank adaptation of a quantized base (Guo et al. 2024, arXiv:2410.21759).

Notation (the paper's, with its reference code's choices; docs/intlora.md): W [C_out, C_in] frozen (a conv kernel
flattened to [C_out, C_in kh kw]), A [r, C_in] (Kaiming-uniform, a = sqrt(5)), B [C_out, r] (zero), b = base bits.

AQS (adaptation-quantization separation): an auxiliary R ~ Laplace(0, 0.5), frozen, drawn from a CPU generator
seeded by (seed, layer name): regenerated on load, never stored. VMC (variance matching control), per row, once:
    R* = (a_W^alpha / (a_R + 1e-8)^alpha) R,  a_W = max(|max_row W|, |min_row W|),  a_R = min(|max_row R|, |min_row R|)
with alpha = `vmc_alpha` (1.5; the reference code's statistics, not the paper's standard deviations).
The base quantizes W - R* per row, asymmetric, L2.4 search: W_int = q - z (signed), scale s.

Multiplicative form: W' = U (.) W_int,  U = s + (R* + s_lora B A) / W_int  (W_int = 0 replaced by 1 in the division)
- MUL: (scale_u, zero_u) fitted per row to U at construction (B A = 0: what the reference does on its first
  forward) by the paper's L2.4 search exactly, the grid not forced to hold 0 (`include_zero=False`: an all-positive
  row of U gets zero_u <= 0, as in the reference);
  U_int = clamp(round_ste(U / scale_u) + zero_u, 0, 2^lb - 1) - zero_u;  W' = scale_u (.) (U_int (.) W_int).
  Merge: the integers U_int (.) W_int (about 2b bits) with the per-row scale_u: exactly the training weight.
- SHIFT: k = round_ste(log2(|U| + 1e-16)), clamped per row to [k_hi - shift_span, k_hi] (k_hi: the row's largest
  k; quantune's stated range, the reference never clamps);  W' = sign(U) (.) 2^k (.) W_int.
  Merge: the integers sign(U) W_int shifted left by k - k_lo (uint8) with the common 2^k_lo per row factored into
  the scale, so the shift loses no bits: exactly the training weight.
Zero-drop: where W_int = 0, W' = 0 (R* and B A are lost there, no gradient). `zero_fix="none"` reproduces it;
`zero_fix="midrise"` (quantune's fix) quantizes the base on a mid-rise grid, W_int = 2 (q - z) + 1 with scale s/2:
the same 2^b levels, none of them zero, so nothing is dropped (W_int needs b + 1 bits).
Activations: optional per-tensor fake quantization of the input (ActQuantizer, calibrated explicitly).
Training: the forward / backward with gradients is one autograd function (quant/intlora_train.py: W' formed once
from the integers, MUL on the step's int8 kernel where it fits, closed-form gradients); this file's float
formulation (`adapted_weight`, `_run`) is the reference it is tested against and runs without gradients (and
while calibration observes the input).
Settings: one IntLoraConfig per layer (rank, alpha, the base's WeightQuant, lora_bits, ActQuant, VMC, seed, fixes).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from quantune.errors import QuantuneError
from quantune.quant.config import ActQuant, WeightQuant
from quantune.quant.intlora_train import IntLoraStep
from quantune.quant.layers import ActQuantizer, _QuantWeight, from_int
from quantune.quant.primitives import check_bits, pack_int4, quantize, round_ste, search_qparams, unpack_int4

AUX_DTYPE = torch.float16  # R* is rounded to fp16 whether cached or regenerated, so both give the same numbers


def layer_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def laplace(shape, scale: float, seed: int) -> torch.Tensor:
    """R ~ Laplace(0, scale) from a CPU generator (the same numbers on every device), inverse-CDF sampling."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=g, dtype=torch.float64) - 0.5
    return (-scale * torch.sign(u) * torch.log1p(-2 * u.abs()).clamp_min(-50)).float()


@dataclass(frozen=True)
class IntLoraConfig:
    """One IntLoRA layer's settings: `mode` "mul" or "shift"; LoRA rank `r` and `alpha` (None: r, scaling
    alpha / r); the base's `weight` quantization (bits and range search; IntLoRA quantizes per row, asymmetric);
    `lora_bits` of MUL's U quantizer (None: the base's bits); `act`: an input quantizer, or None; VMC's `vmc_alpha`;
    `seed` of R (with the layer name); `zero_fix` "none" (the reference's zero-drop) or "midrise"; SHIFT's
    `shift_span`; `cache_aux`: keep R* in memory (fp16) instead of regenerating it every forward."""

    mode: str = "mul"
    r: int = 4
    alpha: float | None = None
    weight: WeightQuant = field(default_factory=WeightQuant)
    lora_bits: int | None = None
    act: ActQuant | None = None
    vmc_alpha: float = 1.5
    seed: int = 0
    zero_fix: str = "none"
    shift_span: int = 15
    cache_aux: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("mul", "shift"):
            raise QuantuneError(f"IntLoRA mode {self.mode!r} is unknown: use 'mul' or 'shift'")
        if self.zero_fix not in ("none", "midrise"):
            raise QuantuneError(f"zero_fix = {self.zero_fix!r} is unknown: use 'none' (faithful) or 'midrise'")
        if not isinstance(self.weight, WeightQuant) or self.weight.symmetric or not self.weight.per_channel:
            raise QuantuneError("IntLoRA's base is quantized per row and asymmetric: give WeightQuant(bits, search)")
        if self.act is not None and not isinstance(self.act, ActQuant):
            raise QuantuneError(f"IntLoraConfig.act must be an ActQuant or None, not {type(self.act).__name__}")
        if self.lora_bits is not None:
            check_bits(self.lora_bits, "lora_bits")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise QuantuneError(f"IntLoRA rank r = {self.r!r} must be a positive integer")
        if not self.vmc_alpha > 0:
            raise QuantuneError(f"vmc_alpha = {self.vmc_alpha!r} must be positive")
        if int(self.shift_span) < 1:
            raise QuantuneError(f"shift_span = {self.shift_span!r} must be at least 1")

    @property
    def u_bits(self) -> int:
        return self.lora_bits if self.lora_bits is not None else self.weight.bits


class IntLoraLayer(nn.Module):
    """An IntLoRA layer (module docstring) on a float nn.Linear / nn.Conv2d `base` named `name`; A is drawn from
    `generator`."""

    def __init__(
        self, base: nn.Module, name: str, config: IntLoraConfig | None = None, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        config = config if config is not None else IntLoraConfig()
        _check_base(base, name)
        self.config = config
        self.mode, self.r, self.bits, self.lora_bits = config.mode, config.r, config.weight.bits, config.u_bits
        self.zero_fix, self.shift_span, self.vmc_alpha = (
            config.zero_fix,
            int(config.shift_span),
            float(config.vmc_alpha),
        )
        self.scaling = (config.alpha if config.alpha is not None else config.r) / config.r
        self.aux_seed = layer_seed(config.seed, name)
        self.weight_shape = tuple(base.weight.shape)
        self.conv = (
            {}
            if isinstance(base, nn.Linear)
            else dict(stride=base.stride, padding=base.padding, dilation=base.dilation)
        )
        self._like = [_meta_copy(base)]  # shape source for merges (not a submodule)
        W = base.weight.detach().float().reshape(self.weight_shape[0], -1)
        rows, cols = W.shape
        self.lora_A = nn.Parameter(torch.empty(config.r, cols))
        self.lora_B = nn.Parameter(torch.zeros(rows, config.r))
        bound = 1.0 / math.sqrt(cols)  # kaiming_uniform(a=sqrt(5)) as nn.Linear and peft
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound, generator=generator)
        self.register_buffer("bias", base.bias.detach().float().clone() if base.bias is not None else None)
        r_star = self._init_aux(W)
        self._init_base(W, r_star)
        act = config.act
        self.act_quant = ActQuantizer(act.bits, act.search) if act is not None else None
        if self.mode == "mul":
            self._init_u_quantizer(W)
        self.kernel_backend: str | None = None  # "auto" etc.: MUL steps on int8 kernels (set by the trainer's ready)
        self.backward_dtype = torch.float32  # of dL/dx's product (quant/train_kernels.py)

    def _init_aux(self, W: torch.Tensor) -> torch.Tensor:
        """VMC: the per-row ratio is all that is kept of W's statistics; R itself is regenerated from the seed."""
        R = laplace(W.shape, 0.5, self.aux_seed)
        a_W = torch.maximum(W.amax(1).abs(), W.amin(1).abs())
        a_R = torch.minimum(R.amax(1).abs(), R.amin(1).abs())
        self.register_buffer("vmc_ratio", (a_W**self.vmc_alpha / (a_R + 1e-8) ** self.vmc_alpha).reshape(-1, 1))
        r_star = self._r_star(R)
        aux = r_star.to(AUX_DTYPE) if self.config.cache_aux else None
        self.register_buffer("aux", aux, persistent=False)  # 2 B/weight
        return r_star

    def _init_base(self, W: torch.Tensor, r_star: torch.Tensor) -> None:
        """The base: W - R*, per row, asymmetric, L2.4 search (mid-rise with the zero fix)."""
        wq = self.config.weight
        qp = search_qparams(W - r_star, wq.bits, search=wq.search, offset=0.5 if self.zero_fix == "midrise" else 0.0)
        self.packed = wq.pack and wq.bits <= 4
        codes = quantize(W - r_star, qp).to(torch.uint8)
        self.register_buffer("codes", pack_int4(codes) if self.packed else codes)
        self.register_buffer("zero_point", qp.zero_point.to(torch.int32))
        self.register_buffer("scale", qp.scale / 2 if self.zero_fix == "midrise" else qp.scale.clone())

    def _init_u_quantizer(self, W: torch.Tensor) -> None:
        """MUL: fit U's quantizer at B A = 0 (the reference's first forward), then freeze it; the paper's search as
        is: no forced 0 in the grid (an all-positive row of U gets z <= 0)."""
        U0 = self._adaptation(self.int_base(), torch.zeros_like(W))
        uq = search_qparams(U0, self.lora_bits, search=self.config.weight.search, include_zero=False)
        self.register_buffer("u_scale", uq.scale)
        self.register_buffer("u_zero", uq.zero_point.to(torch.int32))

    # -- pieces ------------------------------------------------------------------------------------------------
    def _r_star(self, R: torch.Tensor) -> torch.Tensor:
        return (self.vmc_ratio * R).to(AUX_DTYPE).float()

    def r_star(self) -> torch.Tensor:
        if self.aux is not None:
            return self.aux.float()
        R = laplace((self.weight_shape[0], self.lora_A.shape[1]), 0.5, self.aux_seed)
        return self._r_star(R).to(self.scale.device)

    def int_base(self) -> torch.Tensor:
        """W_int as a float tensor of integers [C_out, cols]: q - z, or 2 (q - z) + 1 with the mid-rise fix."""
        q = unpack_int4(self.codes, self.lora_A.shape[1]) if self.packed else self.codes
        w = q.to(torch.int32) - self.zero_point
        return (2 * w + 1 if self.zero_fix == "midrise" else w).float()

    def delta(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def _adaptation(self, w_int: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """U = s + (R* + s_lora B A) / W_int, with W_int = 0 replaced by 1."""
        safe = torch.where(w_int == 0, torch.ones_like(w_int), w_int)
        U = self.scale + (self.r_star() + delta) / safe
        if not torch.isfinite(U).all():
            raise QuantuneError("IntLoRA's adaptation term U has NaN or inf values: lower the learning rate")
        return U

    def _u_int(self, U: torch.Tensor) -> torch.Tensor:
        z = self.u_zero.float()
        return torch.clamp(round_ste(U / self.u_scale) + z, 0, 2**self.lora_bits - 1) - z

    def _shift_exponent(self, U: torch.Tensor) -> torch.Tensor:
        k = round_ste(torch.log2(U.abs() + 1e-16))
        hi = k.detach().amax(1, keepdim=True)
        return torch.clamp(k, min=hi - self.shift_span, max=hi)

    def adapted_weight(self) -> torch.Tensor:
        """W' of the training forward, [C_out, cols] fp32."""
        w_int = self.int_base()
        U = self._adaptation(w_int, self.delta())
        if self.mode == "mul":
            return self.u_scale * (self._u_int(U) * w_int)
        return (torch.sign(U) * w_int) * torch.exp2(self._shift_exponent(U))

    def zero_fraction(self) -> float:
        """Share of base entries with W_int = 0 (dropped from the adaptation)."""
        return float((self.int_base() == 0).float().mean())

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        """Where IntLoRA loses the trained update (the fine-tuning table's per-layer figures): `zero_share`, the
        share of entries with W_int = 0 (their R* + B A is dropped); `aux_ratio`, |R*| / |W| with W = s W_int +
        R*; `u_clipped`, the share of the other entries whose U is outside its grid now (MUL: the codes clamped to
        [0, 2^b - 1]; SHIFT: the exponents clamped below k_max - shift_span)."""
        w_int = self.int_base()
        r_star = self.r_star()
        U = self._adaptation(w_int, self.delta())
        if self.mode == "mul":
            codes = torch.round(U / self.u_scale) + self.u_zero.float()
            clipped = (codes < 0) | (codes > 2**self.lora_bits - 1)
        else:
            k = torch.round(torch.log2(U.abs() + 1e-16))
            clipped = k < k.amax(1, keepdim=True) - self.shift_span
        used = w_int != 0  # U is multiplied by 0 elsewhere: neither used nor clipped
        w = self.scale * w_int + r_star
        return {"zero_share": self.zero_fraction(), "aux_ratio": float(r_star.norm() / w.norm()),
                "u_clipped": float((clipped & used).sum() / used.sum().clamp(min=1))}  # fmt: skip

    # -- forward -----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self._run(x)
        if self.act_quant is not None and self.act_quant.observing:  # calibration sees the float input
            return checkpoint(self._run, x, use_reentrant=False)
        return IntLoraStep.apply(x, self.lora_A, self.lora_B, self)  # saves x only (quant/intlora_train.py)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant is not None:
            x = self.act_quant(x)
        w = self.adapted_weight().view(self.weight_shape).to(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if self.conv:
            return F.conv2d(x, w, bias, **self.conv)
        return F.linear(x, w, bias)

    # -- merge and integer adapter -----------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> _QuantWeight:
        """The integer layer whose weight equals this layer's training weight W' exactly (no PTQ step)."""
        w_int = self.int_base()
        U = self._adaptation(w_int, self.delta())
        like = self._like[0]
        if self.mode == "mul":
            product = self._u_int(U).to(torch.int32) * w_int.to(torch.int32)
            return from_int(like, product, self.u_scale, bits=self.bits, act_quant=self.act_quant, bias=self.bias)
        k = self._shift_exponent(U)
        lo = k.amin(1, keepdim=True)
        signed = (torch.sign(U) * w_int).to(torch.int32)
        return from_int(
            like,
            signed,
            torch.exp2(lo),
            bits=self.bits,
            shift=(k - lo).to(torch.uint8),
            act_quant=self.act_quant,
            bias=self.bias,
        )

    @torch.no_grad()
    def integer_adapter(self) -> dict[str, torch.Tensor]:
        """The adaptation term in integer form (the seed's claim (ii)): MUL: U's codes (lora_bits, packed at 4 bits
        or fewer) + per-row scale / zero; SHIFT: the exponents k - k_lo (uint8), sign bits and k_lo per row."""
        U = self._adaptation(self.int_base(), self.delta())
        if self.mode == "mul":
            codes = (self._u_int(U) + self.u_zero).to(torch.uint8)
            return {
                "u_codes": pack_int4(codes) if self.lora_bits <= 4 else codes,
                "u_scale": self.u_scale,
                "u_zero": self.u_zero,
            }
        k = self._shift_exponent(U)
        lo = k.amin(1, keepdim=True)
        return {"k": (k - lo).to(torch.uint8), "k_lo": lo.to(torch.int8), "sign": (U < 0).to(torch.uint8)}

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode}, shape={list(self.weight_shape)}, r={self.r}, bits={self.bits}, "
            f"lora_bits={self.lora_bits}, zero_fix={self.zero_fix}"
        )


def _check_base(base: nn.Module, name: str) -> None:
    if not isinstance(base, (nn.Linear, nn.Conv2d)):
        raise QuantuneError(f"IntLoRA adapts nn.Linear and nn.Conv2d only, not {type(base).__name__} ({name})")
    if isinstance(base, nn.Conv2d) and (base.groups != 1 or base.padding_mode != "zeros"):
        raise QuantuneError(
            f"IntLoRA supports convs with groups=1 and zero padding only ({name}): exclude it from the targets"
        )


def _meta_copy(base: nn.Module) -> nn.Module:
    """A weightless copy of `base` (meta tensors) that describes its shape and conv arguments."""
    if isinstance(base, nn.Linear):
        return nn.Linear(base.in_features, base.out_features, base.bias is not None, device="meta")
    return nn.Conv2d(
        base.in_channels,
        base.out_channels,
        base.kernel_size,
        base.stride,
        base.padding,
        base.dilation,
        base.groups,
        base.bias is not None,
        base.padding_mode,
        device="meta",
    )
