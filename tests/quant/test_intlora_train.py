"""IntLoRA's training step (quant/intlora_train.py) against autograd through the float formulation
(IntLoraLayer._run, the paper's formulas with round_ste and clamp): the output within float rounding (on the step's
int8 kernel: the integer product is exact, only the epilogue rounds), the gradients of A, B and the input to a
stated tolerance, for MUL and SHIFT, Linear and Conv2d, faithful and mid-rise, weight-only and A8; a bf16 backward
within its rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantune.quant import intlora_train
from quantune.quant.config import ActQuant, WeightQuant
from quantune.quant.intlora import IntLoraConfig, IntLoraLayer
from quantune.quant.kernels import onednn_available
from quantune.quant.primitives import sqnr_db
from quantune.quant.quantize import calibrate

CASES = [(kind, mode, bits, fix) for kind in ("linear", "conv") for mode in ("mul", "shift") for bits in (4, 8)
         for fix in ("none", "midrise")]  # fmt: skip


def _layer(kind: str, mode: str, bits: int, zero_fix: str, act_bits: int | None) -> tuple[IntLoraLayer, torch.Tensor]:
    torch.manual_seed(0)
    base = nn.Linear(64, 32) if kind == "linear" else nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(4, 5, 64) if kind == "linear" else torch.randn(2, 8, 6, 6)
    act = ActQuant(act_bits) if act_bits else None
    config = IntLoraConfig(mode=mode, weight=WeightQuant(bits), act=act, zero_fix=zero_fix)
    layer = IntLoraLayer(base, "blocks.0.to_q", config, torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
        if act_bits:
            calibrate(layer, lambda: layer(x))
    return layer, x


def _grads(layer: IntLoraLayer, x: torch.Tensor, run) -> tuple[torch.Tensor, list[torch.Tensor]]:
    layer.lora_A.grad = layer.lora_B.grad = None
    xin = x.clone().requires_grad_(True)
    y = run(xin)
    (y.square().mean() + y.sum() * 1e-2).backward()
    return y.detach(), [layer.lora_A.grad.clone(), layer.lora_B.grad.clone(), xin.grad.clone()]


def _close(reference: list[torch.Tensor], got: list[torch.Tensor], rel: float) -> None:
    for a, b in zip(reference, got):
        cosine = F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0)
        assert cosine > 1 - rel and (a - b).norm() / a.norm() < rel, (float(cosine), float((a - b).norm() / a.norm()))


@pytest.mark.parametrize("act_bits", [None, 8], ids=["weight-only", "A8"])
@pytest.mark.parametrize(("kind", "mode", "bits", "zero_fix"), CASES)
def test_the_step_equals_autograd_through_the_float_formulation(kind, mode, bits, zero_fix, act_bits):
    layer, x = _layer(kind, mode, bits, zero_fix, act_bits)
    y_ref, g_ref = _grads(layer, x, layer._run)  # autograd through round_ste / clamp
    y, g = _grads(layer, x, layer)
    assert y.grad_fn is None and layer(x.requires_grad_(True)).grad_fn.name() == "IntLoraStepBackward"
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    _close(g_ref, g, 1e-5)  # the same formula, fp32 throughout


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN int8 kernels in this PyTorch build")
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_mul_at_w4a8_runs_on_the_steps_int8_kernel(kind, monkeypatch):
    layer, x = _layer(kind, "mul", 4, "none", 8)
    y_ref, g_ref = _grads(layer, x, layer._run)
    layer.kernel_backend = "auto"  # as the trainer's ready()
    built = []
    real = intlora_train._step_kernel
    monkeypatch.setattr(intlora_train, "_step_kernel", lambda *a: built.append(real(*a)) or built[-1])
    y, g = _grads(layer, x, layer)
    assert built and built[-1] is not None  # W4 x U4: the product fits int8
    assert sqnr_db(y_ref, y) > 60.0  # the integer product is exact; the epilogue rounds in fp32
    _close(g_ref, g, 1e-4)


def test_a_bf16_backward_stays_within_its_rounding():
    layer, x = _layer("linear", "mul", 4, "none", 8)
    _, g_ref = _grads(layer, x, layer)
    layer.backward_dtype = torch.bfloat16
    _, g = _grads(layer, x, layer)
    _close(g_ref[:2], g[:2], 1e-8)  # A and B take G = dL/dy^T x in fp32: unchanged
    _close(g_ref[2:], g[2:], 1e-2)  # dL/dx through a bf16 product


@pytest.mark.parametrize(("kind", "mode", "bits", "zero_fix"), CASES)
def test_the_steps_u_is_the_layers_bit_for_bit(kind, mode, bits, zero_fix):
    """So the integer merge (IntLoraLayer.merge, from the layer's own formulas) is exactly the trained weight."""
    layer, _ = _layer(kind, mode, bits, zero_fix, None)
    w_int, U = intlora_train.base_and_adaptation(layer)
    assert torch.equal(w_int, layer.int_base())
    assert torch.equal(U, layer._adaptation(layer.int_base(), layer.delta()))
    with torch.no_grad():
        torch.testing.assert_close(intlora_train.step_forward(layer, _input(kind)), layer._run(_input(kind)),
                                   rtol=0, atol=0)  # fmt: skip


def _input(kind: str) -> torch.Tensor:
    return torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(3)) if kind == "linear" else torch.randn(
        2, 8, 6, 6, generator=torch.Generator().manual_seed(3))  # fmt: skip
