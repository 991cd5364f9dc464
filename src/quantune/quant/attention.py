"""Quantized attention: the query, key, value and softmax output of a diffusers attention, each through an
activation quantizer (EDA-DM and Q-Diffusion quantize them to 8 bits; the q/k/v/out projections are ordinary
quantized Linear layers).

    Q_hat = AQ_q(Q), K_hat = AQ_k(K), V_hat = AQ_v(V),  P = softmax(Q_hat K_hat^T * scale + mask),  O = AQ_p(P) V_hat

Q, K and V are the tensors that enter the attention product: after diffusers' processor has projected, normed
(qk-norm: RMSNorm / LayerNorm), concatenated the two streams (SD3's and FLUX's joint attention) and rotated them
(FLUX's RoPE). EDA-DM: arXiv 2401.04585; Q-Diffusion: arXiv 2302.04304; for DiTs, ViDiT-Q (arXiv 2406.02540)
quantizes the same post-RoPE tensors; docs/quantization.md.

How: `QuantAttnProcessor` runs diffusers' own processor (AttnProcessor2_0, JointAttnProcessor2_0,
FluxAttnProcessor, ...) unchanged, under a TorchFunctionMode that replaces its one call of
F.scaled_dot_product_attention by the quantized product. Every step before and after the product is diffusers'
code, so masks (PixArt's T5 mask), norms, rotary embeddings and the stream split are computed exactly as diffusers
computes them; only the product is quantune's. A processor not in SUPPORTED is refused by name
(`unsupported_reason`), and a call that does not reach exactly one product (a processor that computes attention
another way) is an error, never a silently float attention.

Deployed (`fused`, set by quant/kernels.py: prepare_int_kernels), the product runs as one fused
F.scaled_dot_product_attention on Q_hat, K_hat, V_hat, in the dtype `sdpa_mode` names ("auto": bf16 where the
input's device runs it natively, CUDA and CPUs with AMX-BF16, decided per call so it follows a move; "fp32";
"input": the input's dtype): P is never formed, so AQ_p is not applied. That drops one rounding the calibration saw
(the output moves toward FP; tests/quant/test_kernels.py states the SQNR against the unfused model). No PyTorch CPU
kernel multiplies batched int8 matrices, and forming the 8-bit P of a 4096-token attention costs more than the
fused float product it would replace.

Written by hand: no diffusers processor exposes q, k, v and the probabilities to quantizers.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from quantune.errors import QuantuneError
from quantune.quant.act import ActQuantizer
from quantune.quant.kernels import fast_bf16

SDPA_MODES = ("auto", "fp32", "input")
# diffusers processors that compute one F.scaled_dot_product_attention per call, every other step their own
SUPPORTED = ("AttnProcessor2_0", "FusedAttnProcessor2_0", "JointAttnProcessor2_0", "FusedJointAttnProcessor2_0",
             "FluxAttnProcessor")  # fmt: skip


def unsupported_reason(attn: nn.Module) -> str | None:
    """Why the quantized attention cannot wrap `attn`'s current processor, or None when it can."""
    proc = attn.processor
    if isinstance(proc, QuantAttnProcessor):
        proc = proc.inner
    name = type(proc).__name__
    if name == "AttnProcessor" and not getattr(attn, "scale_qk", True):
        return "its processor AttnProcessor runs scale_qk=False (scale 1), which AttnProcessor2_0 does not"
    if name == "AttnProcessor":
        return None  # diffusers' pre-2.0 processor: the same attention, replaced by AttnProcessor2_0 (`_inner_of`)
    if name not in SUPPORTED:
        return f"its processor {name} is not one the quantized attention wraps ({', '.join(SUPPORTED)})"
    if getattr(proc, "_attention_backend", None) is not None:
        return f"its processor {name} runs attention backend {proc._attention_backend!r} (use the native one)"
    if getattr(proc, "_parallel_config", None) is not None:
        return f"its processor {name} runs context-parallel attention"
    return None


def _inner_of(attn: nn.Module):
    """The diffusers processor a QuantAttnProcessor wraps on `attn` (refused by name when not supported)."""
    if (reason := unsupported_reason(attn)) is not None:
        raise QuantuneError(f"{type(attn).__name__}: {reason}: pass --attn-bits none to keep attention in float")
    proc = attn.processor
    proc = proc.inner if isinstance(proc, QuantAttnProcessor) else proc
    if type(proc).__name__ == "AttnProcessor":
        from diffusers.models.attention_processor import AttnProcessor2_0

        return AttnProcessor2_0()
    return proc


class _QuantizedProduct(TorchFunctionMode):
    """Within one processor call: F.scaled_dot_product_attention -> the processor's quantized product (counted)."""

    def __init__(self, proc: QuantAttnProcessor) -> None:
        super().__init__()
        self.proc, self.calls = proc, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls += 1
            return self.proc.product(*args, **kwargs)
        return func(*args, **kwargs)


class QuantAttnProcessor(nn.Module):
    """Diffusers' processor `inner` with its attention product quantized (module docstring); `quantizers`: one
    activation quantizer per slot of SLOTS (default: uncalibrated ActQuantizers, as a saved model is rebuilt)."""

    SLOTS = ("q", "k", "v", "p")

    def __init__(self, bits: int, quantizers: dict[str, nn.Module] | None = None, inner=None) -> None:
        super().__init__()
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.bits = bits
        quantizers = quantizers or {s: ActQuantizer(bits) for s in self.SLOTS}
        self.quantizers = nn.ModuleDict({s: quantizers[s] for s in self.SLOTS})
        self.inner = inner if inner is not None else AttnProcessor2_0()
        accepted = inspect.signature(self.inner.__call__).parameters
        self._passes_all = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
        self._accepted = set(accepted)
        self.fused = False  # deployment: one fused SDPA, P unquantized (module docstring)
        self.sdpa_mode = "auto"  # the fused product's dtype (module docstring)

    def __call__(self, attn, hidden_states, *args, encoder_hidden_states=None, attention_mask=None, temb=None,
                 image_rotary_emb=None, **kwargs):  # fmt: skip
        """The inner processor's call: positional arguments in its order (FLUX passes them so), the keywords
        diffusers' attention modules pass (named here: they drop what a processor's signature lacks)."""
        given = dict(encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, temb=temb,
                     image_rotary_emb=image_rotary_emb)  # fmt: skip
        passed = {k: v for k, v in given.items() if v is not None and (self._passes_all or k in self._accepted)}
        mode = _QuantizedProduct(self)
        with mode:
            out = self.inner(attn, hidden_states, *args, **passed, **kwargs)
        if mode.calls != 1:
            raise QuantuneError(
                f"{type(self.inner).__name__} computed {mode.calls} attention products in one call, not one: the "
                "quantized attention cannot cover it; pass --attn-bits none"
            )
        return out

    def product(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False) -> torch.Tensor:  # fmt: skip
        """softmax(AQ_q(Q) AQ_k(K)^T * scale + mask) AQ_v(V), with AQ_p on the probabilities unless fused;
        F.scaled_dot_product_attention's arguments ([B, heads, tokens, head_dim])."""
        if dropout_p or enable_gqa:
            raise QuantuneError("the quantized attention has no dropout or grouped-query attention: run it in eval")
        aq = self.quantizers
        query, key, value = aq["q"](query), aq["k"](key), aq["v"](value)
        if self.fused:
            return self._sdpa(query, key, value, attn_mask, is_causal, scale)
        scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
        scores = (query.float() @ key.float().transpose(-2, -1)) * scale  # fp32 scores, as SDPA accumulates
        if is_causal:
            causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        elif attn_mask is not None:
            scores = scores + attn_mask
        probs = scores.softmax(-1)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            probs = probs.nan_to_num(0.0)  # a row with every key masked: 0, as SDPA's safe softmax gives
        return aq["p"](probs).to(value.dtype) @ value

    def sdpa_dtype(self, device: torch.device) -> torch.dtype | None:
        """The fused product's dtype on `device` (None: the input's)."""
        if self.sdpa_mode == "fp32":
            return torch.float32
        return torch.bfloat16 if self.sdpa_mode == "auto" and fast_bf16(device) else None

    def _sdpa(self, query, key, value, attn_mask, is_causal, scale) -> torch.Tensor:
        dtype, sdpa_dtype = query.dtype, self.sdpa_dtype(query.device)
        if sdpa_dtype is not None:
            query, key, value = query.to(sdpa_dtype), key.to(sdpa_dtype), value.to(sdpa_dtype)
            if attn_mask is not None and attn_mask.is_floating_point():
                attn_mask = attn_mask.to(sdpa_dtype)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
        return out.to(dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, inner={type(self.inner).__name__}"


def attentions(model: nn.Module) -> dict[str, nn.Module]:
    """The diffusers attention modules of `model` (Attention, and the AttentionModuleMixin ones: FLUX's), by name."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return {n: m for n, m in model.named_modules() if isinstance(m, (Attention, AttentionModuleMixin))}


def quantize_attention(attn: nn.Module, bits: int, quantizers: dict[str, nn.Module] | None = None) -> None:
    """Give `attn` a QuantAttnProcessor around its diffusers processor (refused by name when unsupported)."""
    attn.set_processor(QuantAttnProcessor(bits, quantizers, _inner_of(attn)))


def quant_attentions(model: nn.Module) -> dict[str, int]:
    """{attention name: bits} of the attentions that run a QuantAttnProcessor (what the spec records)."""
    return {n: m.processor.bits for n, m in attentions(model).items() if isinstance(m.processor, QuantAttnProcessor)}
