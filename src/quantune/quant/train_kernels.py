"""A frozen integer layer in training (QLoRA's base): the forward on the integer kernel, the backward to its input.

The float path of a training step is y = W_deq fake_quant(x) + b (quant/intlayer.py, checkpointed: the backward
dequantizes W and runs the product again). Here the forward is the layer's integer kernel (quant/kernels.py:
x quantized with the calibrated (s_a, z_a), an int8 x int8 GEMM or conv with int32 accumulation, scales and bias in
the epilogue), and the backward is the same straight-through estimator the fake quantizer defines:

    dL/dx = 1[q_min <= round(x / s_a) + z_a <= q_max] ⊙ (W_deq^T dL/dy)

(W_deq^T dL/dy: a GEMM for a Linear, conv2d's input gradient for a Conv2d), with W dequantized from its integers
for that one product and not kept; only x is saved. The product runs in the layer's `backward_dtype`: fp32, or bf16
where it is faster (`backward_dtype("auto")`: CUDA and CPUs with AVX512-BF16 or AMX). Measured on this project's CPU
(benchmarks/results/backward_gemm.md, SD-1.5 shapes, 256 and 512 px): bf16 1.3-2.4x faster than fp32 with a relative
error of 3-4e-3 (cosine 0.999995) against float64; an int8 GEMM of the dynamically quantized gradient (OneTrainer's
way) 1.05-2.3x, 7-8e-3, and none for convs: bf16 it is. The LoRA gradients through it stay within 1 % of the fp32
path's (tests/quant/test_train_kernels.py). The forward agrees with the float path up to float rounding (the
integer product is exact), the gradient is the same formula, so LoRA's gradients match.
Written here because PyTorch's int8 ops (oneDNN's qlinear / qconv, torch._int_mm) have no autograd.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from quantune.errors import QuantuneError
from quantune.quant.kernels import cpu_flags

BACKWARD_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def backward_dtype(setting: str = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype of the frozen weight's activation-gradient product: "fp32", "bf16", or "auto" (bf16 on CUDA and on
    CPUs with native bf16 dot products, fp32 elsewhere)."""
    if setting == "auto":
        fast = torch.device(device).type == "cuda" or bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
        return torch.bfloat16 if fast else torch.float32
    if setting not in BACKWARD_DTYPES:
        raise QuantuneError(f"backward dtype {setting!r} is unknown: use auto, fp32 or bf16")
    return BACKWARD_DTYPES[setting]


def integer_training_kernel(layer: nn.Module):
    """The layer's integer kernel when a training forward can use it, else None (the float path runs): a prepared
    per-tensor activation quantizer (no shortcut split, no SmoothQuant) and no trainable tensor in the layer."""
    if getattr(layer, "kernel_backend", None) is None or layer.act_quant is None:
        return None
    aq = layer.act_quant
    if aq.split or aq.smooth is not None or aq.observing or any(p.requires_grad for p in layer.parameters()):
        return None
    if layer.qweight.is_cuda and len(layer.weight_shape) == 4:
        return None  # torch._int_mm's conv is an im2col in fp32: not measured against cuDNN in training
    return layer.current_kernel()


def inside_grid(act_quant, x: torch.Tensor) -> torch.Tensor:
    """The straight-through estimator's mask of a per-tensor input quantizer: where round(x / s) + z is not
    clamped (as quant/primitives.fake_quantize's gradient)."""
    qp = act_quant.qparams(0)
    codes = torch.round(x.float() / qp.scale.reshape(())) + qp.zero_point.reshape(())
    return (codes >= qp.qmin) & (codes <= qp.qmax)


class IntegerForward(torch.autograd.Function):
    """y = kernel(x) forward; dL/dx by the straight-through estimator above (module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module, kernel) -> torch.Tensor:
        ctx.layer = layer
        ctx.save_for_backward(x)
        with torch.no_grad():
            return kernel(x).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        layer = ctx.layer
        dtype = layer.backward_dtype
        weight = layer.dequantize_as(dtype)  # for this product only
        dx = layer.input_grad(grad.to(dtype), weight, x.shape).to(grad.dtype)
        return dx.mul_(inside_grid(layer.act_quant, x)), None, None
