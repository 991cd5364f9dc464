"""A frozen integer base in training (QLoRA): the forward on the integer kernels, the backward by the fake
quantizer's straight-through estimator (quant/train_kernels.py). Against the float path (dequantized weights,
fake-quantized inputs): outputs within rounding, LoRA and input gradients equal to a stated tolerance, and the
path falls back to the float one where it cannot run (weight-only, a trainable tensor in the layer)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantune.lora import LoraConfig, add_lora, lora_parameters
from quantune.quant.config import QuantConfig, WeightQuant
from quantune.quant.kernels import drop_int_kernels, onednn_available, prepare_int_kernels
from quantune.quant.primitives import sqnr_db
from quantune.quant.quantize import calibrate, quantize_

pytestmark = pytest.mark.skipif(not onednn_available(), reason="no oneDNN int8 kernels in this PyTorch build")


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 24, 3, padding=1)
        self.proj = nn.Linear(24, 32)
        self.out = nn.Linear(32, 8)

    def forward(self, x):
        h = F.silu(self.conv(x)).permute(0, 2, 3, 1)  # [B, H, W, C]
        return self.out(F.gelu(self.proj(h)))


def _qlora_block(act_bits: int | None = 8, weight: WeightQuant = WeightQuant(bits=4)) -> tuple[Block, torch.Tensor]:
    torch.manual_seed(0)
    model = Block()
    add_lora(model, LoraConfig(r=4, targets=["conv", "proj", "out"], seed=0))
    with torch.no_grad():
        for layer_params in lora_parameters(model):
            layer_params.normal_(0, 0.1)
    quantize_(model, QuantConfig(weight, act_bits=act_bits, targets=r".*\.base_layer"))
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    if act_bits:
        with torch.no_grad():
            calibrate(model, lambda: model(x))
    return model, x


def _step(model, x):
    """Output, LoRA gradients and input gradient of one backward of a fixed loss."""
    for p in lora_parameters(model):
        p.grad = None
    xin = x.clone().requires_grad_(True)
    y = model(xin)
    (y.square().mean() + y.mean()).backward()
    return y.detach(), [p.grad.clone() for p in lora_parameters(model)], xin.grad.clone(), y.grad_fn


@pytest.mark.parametrize("weight", [WeightQuant(bits=4), WeightQuant(bits=8, symmetric=True), WeightQuant(bits=8)],
                         ids=["W4A8", "W8A8 symmetric", "W8A8 asymmetric"])  # fmt: skip
def test_integer_forward_matches_the_float_path_and_its_gradients(weight):
    model, x = _qlora_block(weight=weight)
    y_float, g_float, gx_float, _ = _step(model, x)  # no kernels prepared: the float path
    prepare_int_kernels(model)
    y_int, g_int, gx_int, _ = _step(model, x)
    from quantune.quant.layers import QuantLinear

    base = model.proj.base_layer
    assert isinstance(base, QuantLinear)
    probe = base(torch.randn(3, 24, requires_grad=True))
    assert probe.grad_fn.name() == "IntegerForwardBackward"  # the integer kernel ran the training forward
    assert sqnr_db(y_float, y_int) > 45.0
    for a, b in zip(g_float + [gx_float], g_int + [gx_int]):
        cosine = F.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert cosine > 0.9999 and (a - b).norm() / a.norm() < 1e-2  # equal up to the forward's rounding


def test_the_float_path_runs_where_the_integer_one_cannot():
    for act_bits, weight in ((None, WeightQuant(bits=4)), (6, WeightQuant(bits=4))):  # weight-only; A6
        model, x = _qlora_block(act_bits, weight)
        prepare_int_kernels(model)
        probe = model.proj.base_layer(torch.randn(3, 24, requires_grad=True))
        assert probe.grad_fn.name() != "IntegerForwardBackward"
    model, x = _qlora_block()
    prepare_int_kernels(model)
    model.proj.base_layer.act_quant.scale.mul_(1.5)  # changed in place (a resume): the kernel is built again
    with torch.no_grad():
        want = model.proj.base_layer(torch.ones(1, 24))  # no-grad: the kernel prepared from the new scale too
    got = model.proj.base_layer(torch.ones(1, 24, requires_grad=True))
    torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=0)
    drop_int_kernels(model)
    assert model.proj.base_layer(torch.ones(1, 24, requires_grad=True)).grad_fn.name() != "IntegerForwardBackward"


def test_calibration_observes_the_float_input_with_kernels_prepared():
    """A model whose kernels are prepared is calibrated again: the quantizers see the input (not the kernel's), and
    the kernels follow the new scales in both paths."""
    model, x = _qlora_block()
    prepare_int_kernels(model)
    base = model.proj.base_layer
    before = base.act_quant.scale.clone()
    with torch.no_grad():
        calibrate(model, lambda: model(x * 3.0))  # a wider input range
    assert base.act_quant.scale.item() > before.item()
    with torch.no_grad():
        after = base(torch.full((1, 24), 2.0))
    drop_int_kernels(model)
    with torch.no_grad():
        reference = base(torch.full((1, 24), 2.0))  # the float path with the new scales
    torch.testing.assert_close(after, reference, atol=1e-4, rtol=0)


def test_a_trainable_tensor_in_the_layer_keeps_the_float_path():
    model, _ = _qlora_block()
    prepare_int_kernels(model)
    base = model.proj.base_layer
    base.extra = torch.nn.Parameter(torch.zeros(1))  # e.g. a learned step size
    assert base(torch.ones(1, 24, requires_grad=True)).grad_fn.name() != "IntegerForwardBackward"


def test_a_bf16_input_gradient_costs_a_stated_error():
    """The activation gradient through the frozen weight in bf16 (quant.backward_dtype): the LoRA gradients of the
    layers before it within 1 % (relative L2) of the fp32 product's, cosine > 0.9999."""
    model, x = _qlora_block()
    prepare_int_kernels(model)
    _, g32, gx32, _ = _step(model, x)
    for layer in (model.conv.base_layer, model.proj.base_layer, model.out.base_layer):
        layer.backward_dtype = torch.bfloat16
    _, g16, gx16, _ = _step(model, x)
    for a, b in zip(g32 + [gx32], g16 + [gx16]):
        cosine = F.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert cosine > 0.9999 and (a - b).norm() / a.norm() < 1e-2
    assert any(not torch.equal(a, b) for a, b in zip(g32, g16))  # the bf16 product did run


def test_dequantize_as_equals_dequantize():
    model, _ = _qlora_block()
    for layer in (model.conv.base_layer, model.proj.base_layer):
        torch.testing.assert_close(layer.dequantize_as(torch.float32), layer.dequantize(), rtol=0, atol=0)
        torch.testing.assert_close(layer.dequantize_as(torch.bfloat16).float(), layer.dequantize(), rtol=1e-2,
                                   atol=1e-6)  # fmt: skip
