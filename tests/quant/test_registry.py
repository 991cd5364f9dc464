"""The integer-layer registry (spec / from_spec per class, a new class is one registration) and the kernel list
(first supporting kernel chosen, the others' reasons logged, kernels that follow moves and state-dict loads)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from quantune.quant import ActQuant, QuantConfig, WeightQuant, calibrate, quantize_
from quantune.quant import kernels as K
from quantune.quant.intlayer import INT_LAYERS, IntLayer, layer_from_spec, register_int_layer
from quantune.quant.layers import QuantConv2d, QuantLinear, quantize_layer
from quantune.quant.primitives import sqnr_db


def _calibrated(layer: nn.Module, x: torch.Tensor, bits: int = 8, symmetric: bool = True) -> IntLayer:
    q = quantize_layer(layer, WeightQuant(bits, symmetric=symmetric), ActQuant(8))
    calibrate(q, lambda: q(x))
    return q


@pytest.mark.parametrize(
    "layer",
    [nn.Linear(12, 6), nn.Linear(12, 6, bias=False), nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.Conv2d(4, 8, 1)],
)
def test_every_registered_class_rebuilds_from_its_spec(layer):
    q = quantize_layer(layer, WeightQuant(4), ActQuant(8))
    empty = layer_from_spec(q.spec())
    assert type(empty) is type(q) and empty.spec() == q.spec()
    empty.load_state_dict(q.state_dict())
    assert torch.equal(empty.dequantize(), q.dequantize())
    assert set(INT_LAYERS) >= {"QuantLinear", "QuantConv2d"} and layer_from_spec({"class": "Nope"}) is None


def test_a_new_integer_layer_is_one_registered_class():
    """A float nn.Linear subclass with its own integer class: registered, it is what quantize_ and quantize_layer
    build for that subclass (plain nn.Linear still gets QuantLinear), and what its spec rebuilds."""

    class Scaled(nn.Linear):
        pass

    class QuantScaled(QuantLinear):
        float_types = (Scaled,)

        def _run(self, x):
            return 2 * super()._run(x)

    register_int_layer(QuantScaled)
    try:
        model = nn.Sequential(Scaled(8, 4), nn.Linear(8, 8))
        quantize_(model, QuantConfig(WeightQuant(8)))
        assert type(model[0]) is QuantScaled and type(model[1]) is QuantLinear
        q = quantize_layer(Scaled(8, 4), WeightQuant(8))
        assert type(q) is QuantScaled and type(layer_from_spec(q.spec())) is QuantScaled
    finally:
        INT_LAYERS.pop("QuantScaled")


def test_first_supporting_kernel_is_chosen_and_reasons_are_logged(caplog):
    torch.manual_seed(0)
    x = torch.randn(3, 16)
    q = _calibrated(nn.Linear(16, 8), x)
    calls = []

    def refuse(layer):
        calls.append("refuse")
        return "not today"

    K.register_kernel(K.KernelChoice("never", refuse, lambda layer: None), first=True)
    try:
        with caplog.at_level(logging.DEBUG, logger="quantune.quant.kernels"):
            kernel, way = K.select_kernel(q)
        assert calls == ["refuse"] and kernel is not None and way in ("int8 (onednn)", "int8 (int_mm)")
        assert "no never kernel (not today)" in caplog.text
        assert K.select_kernel(q, "never") == (None, "dequantized (not today)")
    finally:
        K.KERNELS.pop(0)
    w_only = quantize_layer(nn.Linear(16, 8), WeightQuant(4))
    assert K.select_kernel(w_only) == (None, "dequantized (weight-only)")  # the last candidate's reason


def test_kernel_follows_a_move_and_a_state_dict_load():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 7, 7) * 2
    q = _calibrated(nn.Conv2d(6, 8, 3, padding=1), x)
    other = _calibrated(nn.Conv2d(6, 8, 3, padding=1), x * 3)
    with torch.no_grad():
        ref = q(x)
        K.prepare_int_kernels(q)
        assert q.kernel is not None
        kernel_out = q(x)
        q.to(torch.device("cpu"))  # any .to() goes through _apply: the kernel is dropped ...
        assert q.kernel is None
        assert torch.equal(q(x), kernel_out) and q.kernel is not None  # ... and selected again when run
        q._kernel_device = torch.device("meta")  # as if selected on another device: selected again here
        assert torch.equal(q(x), kernel_out) and q.kernel.device == torch.device("cpu")
        q.load_state_dict(other.state_dict())  # new integers and scales: the old kernel would be wrong
        assert sqnr_db(other(x), q(x)) > 60 and q.kernel is not None
    assert sqnr_db(ref, kernel_out) > 60


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_follows_a_move_to_cuda():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 9, 9)
    q = _calibrated(nn.Conv2d(16, 24, 3, padding=1), x)
    with torch.no_grad():
        K.prepare_int_kernels(q)
        q.to("cuda")
        out = q(x.cuda())
        assert q.kernel is not None and q.kernel.device.type == "cuda" and q.kernel.backend == "int_mm"
        K.drop_int_kernels(q)
        assert sqnr_db(q(x.cuda()), out) > 50


def test_conv_spec_keeps_its_arguments():
    q = quantize_layer(nn.Conv2d(4, 8, (3, 1), stride=(2, 1), padding=(1, 0), dilation=1, groups=2), WeightQuant(8))
    rebuilt = QuantConv2d.from_spec(q.spec())
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
        assert getattr(rebuilt, name) == getattr(q, name)
