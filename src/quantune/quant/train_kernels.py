"""A frozen integer layer in training (QLoRA's base): the forward on the integer kernel, the backward to its input.

The float path of a training step is y = W_deq fake_quant(x) + b (quant/intlayer.py, checkpointed: the backward
dequantizes W and runs the product again). Here the forward is the layer's integer kernel (quant/kernels.py:
x quantized with the calibrated (s_a, z_a), an int8 x int8 GEMM or conv with int32 accumulation, scales and bias in
the epilogue), and the backward is the same straight-through estimator the fake quantizer defines:

    dL/dx = 1[q_min <= round(x / s_a) + z_a <= q_max] ⊙ (W_deq^T dL/dy)

(W_deq^T dL/dy: a float GEMM for a Linear, conv2d's input gradient for a Conv2d), with W dequantized for that one
product and not kept; only x is saved. The forward agrees with the float path up to float rounding (the integer
product is exact), the gradient is the same formula, so LoRA's gradients match (tests/quant/test_train_kernels.py).
Written here because PyTorch's int8 ops (oneDNN's qlinear / qconv, torch._int_mm) have no autograd.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable


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
        qp = layer.act_quant.qparams(0)
        codes = torch.round(x.float() / qp.scale.reshape(())) + qp.zero_point.reshape(())
        inside = (codes >= qp.qmin) & (codes <= qp.qmax)
        weight = layer.dequantize().to(grad.dtype)  # for this product only
        return layer.input_grad(grad, weight, x.shape) * inside.to(grad.dtype), None, None
