"""Quantized attention: the query, key, value and softmax output of a diffusers Attention, each through an
activation quantizer (EDA-DM and Q-Diffusion quantize them to 8 bits; the q/k/v/out projections are ordinary
quantized Linear layers).

    Q_hat = AQ_q(Q), K_hat = AQ_k(K), V_hat = AQ_v(V),  P = softmax(Q_hat K_hat^T / sqrt(d)),  O = AQ_p(P) V_hat

The quantizers are the processor's submodules, so their scales are saved with the UNet's state and the saved spec
(quantune_quant.json, quant/quantize.py) lists the attentions that carry them. EDA-DM: arXiv 2401.04585;
Q-Diffusion: arXiv 2302.04304; docs/quantization.md. The products run in float on the fake-quantized values.

Deployed (`fused`, set by quant/kernels.py: prepare_int_kernels), the products run as one fused
F.scaled_dot_product_attention on Q_hat, K_hat, V_hat, in the dtype `sdpa_mode` names ("auto": bf16 where the
input's device runs it natively, CUDA and CPUs with AMX-BF16, decided per call so it follows a move; "fp32"; "input":
the input's dtype): P is never formed, so AQ_p is not applied. That drops one rounding the
calibration saw (the output moves toward FP; tests/quant/test_kernels.py states the SQNR against the unfused
model). No PyTorch CPU kernel multiplies batched int8 matrices, and forming the 8-bit P of a 4096-token attention
costs more than the fused float product it would replace.

Written by hand after diffusers' AttnProcessor (same steps: spatial norm, 4-D input, group norm, cross norm,
residual, rescale), because no diffusers processor exposes q, k, v and the probabilities to quantizers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantune.quant.act import ActQuantizer
from quantune.quant.kernels import fast_bf16

SDPA_MODES = ("auto", "fp32", "input")


class QuantAttnProcessor(nn.Module):
    SLOTS = ("q", "k", "v", "p")

    def __init__(self, bits: int, quantizers: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.bits = bits
        quantizers = quantizers or {s: ActQuantizer(bits) for s in self.SLOTS}
        self.quantizers = nn.ModuleDict({s: quantizers[s] for s in self.SLOTS})
        self.fused = False  # deployment: one fused SDPA, P unquantized (module docstring)
        self.sdpa_mode = "auto"  # the fused product's dtype (module docstring)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        aq = self.quantizers
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], context.shape[0])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value, query = (
            aq["k"](attn.to_k(encoder_hidden_states)),
            aq["v"](attn.to_v(encoder_hidden_states)),
            aq["q"](query),
        )
        if self.fused:
            hidden_states = self._sdpa(attn, query, key, value, attention_mask)
        else:
            key, value, query = (
                attn.head_to_batch_dim(key),
                attn.head_to_batch_dim(value),
                attn.head_to_batch_dim(query),
            )
            probs = aq["p"](attn.get_attention_scores(query, key, attention_mask))
            hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def sdpa_dtype(self, device: torch.device) -> torch.dtype | None:
        """The fused product's dtype on `device` (None: the input's)."""
        if self.sdpa_mode == "fp32":
            return torch.float32
        return torch.bfloat16 if self.sdpa_mode == "auto" and fast_bf16(device) else None

    def _sdpa(self, attn, query, key, value, attention_mask) -> torch.Tensor:
        dtype, sdpa_dtype = query.dtype, self.sdpa_dtype(query.device)
        batch, heads = query.shape[0], attn.heads

        def split(x):
            x = x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)
            return x.to(sdpa_dtype) if sdpa_dtype is not None else x

        mask = attention_mask.view(batch, heads, -1, attention_mask.shape[-1]) if attention_mask is not None else None
        out = F.scaled_dot_product_attention(split(query), split(key), split(value), attn_mask=mask, scale=attn.scale)
        return out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[-1]).to(dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def attentions(model: nn.Module) -> dict[str, nn.Module]:
    """The diffusers Attention modules of `model`, by name."""
    from diffusers.models.attention_processor import Attention

    return {n: m for n, m in model.named_modules() if isinstance(m, Attention)}


def quant_attentions(model: nn.Module) -> dict[str, int]:
    """{attention name: bits} of the attentions that run a QuantAttnProcessor (what the spec records)."""
    return {n: m.processor.bits for n, m in attentions(model).items() if isinstance(m.processor, QuantAttnProcessor)}
