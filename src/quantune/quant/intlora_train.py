"""IntLoRA's training step as one autograd function (the method: quant/intlora.py, docs/intlora.md).

Autograd through IntLoRA's float formulation keeps every elementwise intermediate of W' (U, its rounding, the
product) for the backward, or, checkpointed, builds W' twice and then runs an elementwise backward over the whole
weight; here W' is formed once per pass from the integers and the gradients are written in closed form, equal to
what autograd gives for round_ste and clamp (tests/quant/test_intlora_train.py):

Forward (no intermediate kept; only x is saved):
  MUL:   P = U_int ⊙ W_int (integers), W' = s_u P. With an 8-bit input quantizer and P inside int8 (W4 bases, as
         a rule) y is the int8 kernel of (P, s_u) (quant/kernels.py, built for the step: the step's integer model);
         else y = x_q W'^T + b in fp32, exact.
  SHIFT: W' = sign(U) ⊙ W_int ⊙ 2^k; the shifts take the integers beyond int8, so y = x_q W'^T + b in fp32.
Backward (U rebuilt from the integers, the layer's weight at a time; G = dL/dy^T x_q, conv2d_weight for a conv):
  MUL:   dL/dΔ = G ⊙ 1[W_int ≠ 0] ⊙ 1[0 <= round(U / s_u) + z_u <= 2^lb - 1]   (plain LoRA's, masked: spec §4)
  SHIFT: dL/dΔ = G ⊙ 1[W_int ≠ 0, U ≠ 0] ⊙ 1[k_hi - span <= k <= k_hi] ⊙ 2^k / (|U| + 1e-16)
  dL/dB = s_lora dL/dΔ A^T,  dL/dA = s_lora B^T dL/dΔ   (Δ = s_lora B A)
  dL/dx = 1[x inside the input grid] ⊙ (dL/dy W')   in the layer's `backward_dtype` (quant/train_kernels.py)
U is formed by the same operations in the same order as IntLoraLayer's (the same bits: the merge still equals the
training weight exactly), in place, with one finiteness check on a sum. Written by hand: no library trains IntLoRA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from quantune.errors import QuantuneError
from quantune.quant.kernels import select_kernel
from quantune.quant.layers import from_int
from quantune.quant.primitives import unpack_int4
from quantune.quant.train_kernels import inside_grid


class IntLoraStep(torch.autograd.Function):
    """y = IntLoRA layer(x) with the closed-form backward of the module docstring; A and B are inputs so that
    autograd hands their gradients to the optimizer."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer = layer
        ctx.save_for_backward(x)
        with torch.no_grad():
            return step_forward(layer, x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        layer = ctx.layer
        G = _weight_grad(layer, x, grad)
        w_int, U = base_and_adaptation(layer)
        if layer.mode == "mul":
            v = _u_codes(layer, U)
            del U
            clamped = v.clamp(0, 2**layer.lora_bits - 1)
            G.mul_(_nonzero(w_int).mul_(_nonzero(clamped - v).neg_().add_(1)))  # W_int != 0, v not clamped
            del v
            weight = _mul_weight(layer, clamped, w_int) if ctx.needs_input_grad[0] else None
        else:
            weight = _shift_weight(layer, w_int, U) if ctx.needs_input_grad[0] else None
            G.mul_(_shift_factor(layer, w_int, U))
            del U
        del w_int
        dA = dB = dx = None
        if weight is not None:
            dtype = layer.backward_dtype
            dx = _input_grad(layer, grad.to(dtype), weight.to(dtype).view(layer.weight_shape), x.shape)
            dx = dx.to(grad.dtype)
            if layer.act_quant is not None:
                dx.mul_(inside_grid(layer.act_quant, x))
        del weight
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:  # dL/dDelta = G now
            dB = (G @ layer.lora_A.float().t()).mul_(layer.scaling).to(layer.lora_B.dtype)
            dA = (layer.lora_B.float().t() @ G).mul_(layer.scaling).to(layer.lora_A.dtype)
        return dx, dA, dB, None


def base_and_adaptation(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_int, U) as IntLoraLayer.int_base and _adaptation give them, bit for bit: U = s + (R* + Delta) / W_int
    with W_int = 0 read as 1."""
    q = unpack_int4(layer.codes, layer.lora_A.shape[1]) if layer.packed else layer.codes
    w_int = q.float().sub_(layer.zero_point.float())  # q - z: exact integers
    U = layer.delta()
    U.add_(layer.r_star())  # R* + Delta (r_star() may be the cache itself: only ever read here)
    if layer.zero_fix == "midrise":
        w_int.mul_(2).add_(1)  # never 0
        U.div_(w_int)
    else:  # W_int + 1 - 1[W_int != 0]: W_int, and 1 where it is 0
        U.div_(_nonzero(w_int).neg_().add_(1).add_(w_int))
    U.add_(layer.scale)
    if not torch.isfinite(U.sum()):
        raise QuantuneError("IntLoRA's adaptation term U has NaN or inf values: lower the learning rate")
    return w_int, U


def step_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's output for the current A, B: on the step's int8 kernel where it can run, else in fp32."""
    w_int, U = base_and_adaptation(layer)
    if layer.mode == "mul":
        v = _u_codes(layer, U)
        del U
        P = v.clamp_(0, 2**layer.lora_bits - 1).sub_(layer.u_zero.float()).mul_(w_int)  # U_int W_int
        del w_int
        kernel = _step_kernel(layer, P)
        if kernel is not None:
            return kernel(x)
        weight = P.mul_(layer.u_scale)
    else:
        weight = _shift_weight(layer, w_int, U)
        del U, w_int
    x = layer.act_quant(x) if layer.act_quant is not None else x
    weight = weight.view(layer.weight_shape).to(x.dtype)
    bias = layer.bias.to(x.dtype) if layer.bias is not None else None
    return F.conv2d(x, weight, bias, **layer.conv) if layer.conv else F.linear(x, weight, bias)


def _u_codes(layer: nn.Module, U: torch.Tensor) -> torch.Tensor:
    """round(U / s_u) + z_u before the clamp (MUL)."""
    return torch.div(U, layer.u_scale).round_().add_(layer.u_zero.float())


def _mul_weight(layer: nn.Module, clamped: torch.Tensor, w_int: torch.Tensor) -> torch.Tensor:
    """W' = s_u (U_int W_int) from the clamped codes (in place)."""
    return clamped.sub_(layer.u_zero.float()).mul_(w_int).mul_(layer.u_scale)


def _shift_weight(layer: nn.Module, w_int: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """W' = sign(U) W_int 2^k (as IntLoraLayer.adapted_weight)."""
    return torch.sign(U).mul_(w_int).mul_(torch.exp2(layer._shift_exponent(U)))


def _step_kernel(layer: nn.Module, P: torch.Tensor):
    """The int8 kernel of W' = s_u P for this step, or None when it cannot run (no 8-bit input quantizer, P
    beyond int8, a conv on CUDA, no kernel for the device)."""
    aq = layer.act_quant
    if layer.kernel_backend is None or aq is None or aq.bits != 8 or not bool(aq.calibrated) or aq.observing:
        return None
    lo, hi = torch.aminmax(P)
    if P.is_cuda and layer.conv or int(lo) < -128 or int(hi) > 127:
        return None
    step = from_int(layer._like[0], P, layer.u_scale, bits=8, act_quant=aq, bias=layer.bias)  # on P's device
    kernel, _ = select_kernel(step, layer.kernel_backend)
    return kernel


def _shift_factor(layer: nn.Module, w_int: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """1[W_int != 0, U != 0, k not clamped] 2^k / (|U| + 1e-16)."""
    magnitude = U.abs().add_(1e-16)
    k = torch.round(torch.log2(magnitude))
    clamped = k.clamp(min=k.amax(1, keepdim=True) - layer.shift_span)
    keep = _nonzero(w_int).mul_(_nonzero(U)).mul_(_nonzero(clamped - k).neg_().add_(1))
    return torch.exp2(clamped).div_(magnitude).mul_(keep)


def _nonzero(t: torch.Tensor) -> torch.Tensor:
    """1.0 where `t` is not 0, else 0.0, as a float tensor (comparisons to bool and bool products ran ~3x slower
    than these float passes on this project's CPU)."""
    return t.sign().abs_()


def _weight_grad(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """G = dL/dW' [C_out, cols] fp32 for the fake-quantized input."""
    x_q = (layer.act_quant(x) if layer.act_quant is not None else x).float()
    g = grad.float()
    if layer.conv:
        G = torch.nn.grad.conv2d_weight(x_q, layer.weight_shape, g, **layer.conv)
        return G.reshape(layer.weight_shape[0], -1)
    return g.reshape(-1, g.shape[-1]).t() @ x_q.reshape(-1, x_q.shape[-1])


def _input_grad(layer: nn.Module, grad: torch.Tensor, weight: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
    if layer.conv:
        return torch.nn.grad.conv2d_input(x_shape, weight, grad, **layer.conv)
    return grad @ weight
