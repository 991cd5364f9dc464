"""LoRA layers: forward = base + s * B A, get_delta_weight, merge(safe) / unmerge, conv hard and soft."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantune.errors import QuantuneError
from quantune.lora import LoraLayer

ATOL = 1e-5  # fp32, layers of width <= 64


def _random_up(layer: LoraLayer) -> LoraLayer:
    with torch.no_grad():
        layer.lora_up.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    return layer


def test_zero_init_starts_at_base():
    base = nn.Linear(16, 8)
    layer = LoraLayer(base, r=4, alpha=8)
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("rslora", [False, True])
def test_linear_forward_matches_delta(rslora):
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = _random_up(LoraLayer(base, r=4, alpha=2.0, use_rslora=rslora))
    scale = 2.0 / (2.0 if rslora else 4.0)
    assert float(layer.scale) == pytest.approx(scale)
    x = torch.randn(5, 16)
    expected = x @ (base.weight + scale * layer.lora_up.weight @ layer.lora_down.weight).T + base.bias
    torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)
    assert layer.alpha == pytest.approx(scale * 4)


@pytest.mark.parametrize("kernel,stride,padding,dilation", [(3, 1, 1, 1), (3, 2, 1, 1), (1, 1, 0, 1), (5, 2, 2, 2)])
def test_hard_conv_merges_exactly(kernel, stride, padding, dilation):
    torch.manual_seed(0)
    base = nn.Conv2d(6, 10, kernel, stride=stride, padding=padding, dilation=dilation)
    layer = _random_up(LoraLayer(base, r=3, alpha=3.0))
    x = torch.randn(2, 6, 17, 17)
    y = layer(x)
    reference = nn.functional.conv2d(x, base.weight + layer.get_delta_weight(), base.bias, stride, padding, dilation)
    torch.testing.assert_close(y, reference, atol=ATOL, rtol=0)
    w0 = base.weight.clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, atol=ATOL, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(base.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), y, atol=ATOL, rtol=0)


def test_soft_conv_runs_parallel_and_refuses_merge():
    torch.manual_seed(0)
    base = nn.Conv2d(4, 6, 3, padding=1)
    layer = _random_up(LoraLayer(base, r=2, alpha=2.0, conv_mode="soft"))
    assert layer.soft and layer.lora_up.kernel_size == (3, 3)
    x = torch.randn(1, 4, 9, 9)
    expected = base(x) + layer.lora_up(layer.lora_down(x))
    torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)
    with pytest.raises(QuantuneError, match="soft"):
        layer.merge()


def test_merge_refuses_nan():
    layer = LoraLayer(nn.Linear(4, 4), r=2, alpha=2.0)
    with torch.no_grad():
        layer.lora_up.weight.fill_(float("nan"))
    w0 = layer.base_layer.weight.clone()
    with pytest.raises(QuantuneError, match="NaN"):
        layer.merge(safe=True)
    assert torch.equal(layer.base_layer.weight, w0) and not layer.merged


def test_multiplier_scales_the_update_and_zero_is_off():
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    layer = _random_up(LoraLayer(base, r=2, alpha=2.0))
    x = torch.randn(3, 8)
    full = layer(x) - base(x)
    layer.multiplier = 0.5
    torch.testing.assert_close(layer(x) - base(x), 0.5 * full, atol=ATOL, rtol=0)
    layer.multiplier = 0.0
    assert torch.equal(layer(x), base(x))  # a LoRA at scale 0 does not act at all


def test_trainable_scale_gets_gradient():
    layer = _random_up(LoraLayer(nn.Linear(8, 8), r=2, alpha=2.0, trainable_scale=True))
    assert isinstance(layer.scale, nn.Parameter)
    layer(torch.randn(2, 8)).sum().backward()
    assert layer.scale.grad is not None and layer.scale.grad.abs() > 0


def test_gaussian_init_and_unsupported_modules():
    layer = LoraLayer(nn.Linear(64, 64), r=8, alpha=8, init="gaussian", generator=torch.Generator().manual_seed(0))
    assert layer.lora_down.weight.std().item() == pytest.approx(1 / 8, rel=0.15)
    with pytest.raises(QuantuneError, match="Linear and nn.Conv2d"):
        LoraLayer(nn.LayerNorm(4), r=2, alpha=2)
    with pytest.raises(QuantuneError, match="grouped"):
        LoraLayer(nn.Conv2d(4, 4, 3, groups=2), r=2, alpha=2)


def test_loading_a_state_dict_updates_the_scale_used_in_forward():
    torch.manual_seed(0)
    a = _random_up(LoraLayer(nn.Linear(8, 8), r=2, alpha=2.0))
    b = LoraLayer(nn.Linear(8, 8), r=2, alpha=8.0)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 8)
    torch.testing.assert_close(b(x), a(x), atol=ATOL, rtol=0)
