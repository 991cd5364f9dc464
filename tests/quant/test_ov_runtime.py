"""The OpenVINO backend: quantune's integer layers and models on OpenVINO against the PyTorch integer kernels (same
integers and scales), per layer and per model, and the clean fallbacks to PyTorch."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from quantune.quant import calibrate, from_float
from quantune.quant.kernels import prepare_int_kernels
from quantune.quant.ov_export import export_view, openvino_missing
from quantune.quant.ov_runtime import OpenVINOModule
from quantune.quant.primitives import sqnr_db

pytestmark = pytest.mark.skipif(openvino_missing() is not None, reason="OpenVINO is not installed")

LAYERS = {
    "linear": (lambda: nn.Linear(64, 48), (3, 10, 64)),
    "conv3x3": (lambda: nn.Conv2d(16, 24, 3, padding=1), (2, 16, 9, 9)),
    "conv3x3_stride2": (lambda: nn.Conv2d(16, 24, 3, stride=2, padding=1), (2, 16, 9, 9)),
    "conv1x1": (lambda: nn.Conv2d(16, 24, 1), (2, 16, 9, 9)),
}
# (weight bits, symmetric, activation bits): W8A8, W4A8, W4A16 (weight-only)
WIDTHS = [(8, True, 8), (4, False, 8), (4, False, None)]


def _layer(kind: str, wbits: int, symmetric: bool, abits: int | None):
    torch.manual_seed(0)
    make, shape = LAYERS[kind]
    x = torch.randn(*shape) * 2 + 0.5
    q = from_float(make(), wbits, symmetric=symmetric, act_bits=abits)
    if abits:
        calibrate(q, lambda: q(x))
    return q, x


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("wbits,symmetric,abits", WIDTHS)
def test_layer_matches_the_integer_kernels(kind, wbits, symmetric, abits):
    q, x = _layer(kind, wbits, symmetric, abits)
    with torch.no_grad():
        prepare_int_kernels(q)
        ref = q(x)
        deployed = OpenVINOModule(q)
        out = deployed(x)
    assert deployed.calls == {"openvino": 1, "torch": 0}  # no fallback (PyTorch's output would pass the SQNR)
    assert out.shape == ref.shape
    # same integers and scales; OpenVINO may write a conv's output (and run weight-only layers) in bf16 on CPUs
    # with native bf16: measured 44-146 dB, bf16's 8-bit mantissa bounds it near 50 dB
    assert sqnr_db(ref, out) > 40


def test_export_view_shows_fake_quantize_and_restores_the_model():
    import openvino as ov

    q, x = _layer("conv3x3", 8, True, 8)
    model = nn.Sequential(q, nn.SiLU())
    with torch.no_grad(), export_view(model) as view:
        assert type(view[0]).__name__ == "_ExportLayer"
        ov_model = ov.convert_model(view, example_input=(x,))
    assert model[0] is q  # restored
    types = [op.get_type_name() for op in ov_model.get_ops()]
    assert "FakeQuantize" in types
    assert any(op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8 for op in ov_model.get_ops())
    runtime = ov.Core().compile_model(ov_model, "CPU").get_runtime_model()
    precisions = {(op.get_rt_info()["layerType"].astype(str), op.get_rt_info()["runtimePrecision"].astype(str))
                  for op in runtime.get_ops()}  # fmt: skip
    assert ("Convolution", "u8") in precisions  # OpenVINO runs the conv on the uint8 codes and int8 weights


def test_split_and_smoothed_layers():
    from quantune.quant.layers import ActQuantizer, from_codes
    from quantune.quant.primitives import quantize, search_qparams

    torch.manual_seed(0)
    conv = nn.Conv2d(24, 16, 3, padding=1)
    x = torch.cat([torch.randn(2, 10, 7, 7) * 5, torch.randn(2, 14, 7, 7) * 0.3 + 1], 1)
    rows = conv.weight.detach().reshape(16, -1)
    qp = search_qparams(rows, 8, per_channel=True, symmetric=True)
    split = from_codes(conv, quantize(rows, qp), qp, act_quant=ActQuantizer(8, split=10))
    calibrate(split, lambda: split(x))
    lin = nn.Linear(32, 8)
    xs = torch.randn(4, 32) * torch.linspace(0.1, 30, 32)  # outlier channels
    smooth = torch.linspace(0.5, 4, 32)
    aq = ActQuantizer(8, smooth=32)
    aq.smooth.copy_(smooth)
    smoothed = from_float(lin, 8, symmetric=True, weight=lin.weight.detach() * smooth, act_bits=8)
    smoothed.act_quant = aq
    calibrate(smoothed, lambda: smoothed(xs))
    for layer, inp in ((split, x), (smoothed, xs)):
        with torch.no_grad():
            prepare_int_kernels(layer)
            deployed = OpenVINOModule(layer)
            assert sqnr_db(layer(inp), deployed(inp)) > 40 and deployed.calls == {"openvino": 1, "torch": 0}


@pytest.mark.parametrize("symmetric", [True, False])
def test_split_weight_grids_run_in_int8(symmetric):
    """A weight grid per part (EDA-DM's reference preset): each part's conv on its own int8 constant and scales, on
    uint8 codes in OpenVINO (symmetric); asymmetric 8-bit integers beyond int8 go as float weights, still exact."""
    import openvino as ov

    torch.manual_seed(0)
    conv = nn.Conv2d(24, 16, 3, padding=1)
    with torch.no_grad():
        conv.weight[:, 10:] *= 0.05
    x = torch.cat([torch.randn(2, 10, 7, 7) * 5, torch.randn(2, 14, 7, 7) * 0.3 + 1], 1)
    layer = from_float(conv, 8, symmetric=symmetric, act_bits=8, split=10)
    calibrate(layer, lambda: layer(x))
    with torch.no_grad():
        prepare_int_kernels(layer)
        deployed = OpenVINOModule(layer)
        assert sqnr_db(layer(x), deployed(x)) > 40 and deployed.calls == {"openvino": 1, "torch": 0}
        with export_view(layer) as view:
            ov_model = ov.convert_model(view, example_input=(x,))
    runtime = ov.Core().compile_model(ov_model, "CPU").get_runtime_model()
    convs = [op.get_rt_info()["runtimePrecision"].astype(str) for op in runtime.get_ops()
             if op.get_rt_info()["layerType"].astype(str) == "Convolution"]  # fmt: skip
    assert len(convs) == 2 and (convs == ["u8", "u8"]) == symmetric


@pytest.fixture
def w8a8_tiny(tiny):
    from quantune.ptq import PTQConfig, quantize_pipeline

    quantize_pipeline(tiny, PTQConfig(method="minmax", calib_samples=4, steps=4, resolution=16), progress=False)
    prepare_int_kernels(tiny.unet)
    return tiny


def _probe():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([900, 100]), torch.randn(2, 77, 32, generator=g)


def test_model_matches_the_integer_kernels_and_calls_like_the_unet(w8a8_tiny):
    unet = w8a8_tiny.unet
    x, t, ehs = _probe()
    with torch.no_grad():
        ref = unet(x, t, ehs).sample
        ov_unet = OpenVINOModule(unet)
        out = ov_unet(x, t, encoder_hidden_states=ehs)
        again = ov_unet(x, t, ehs, return_dict=False)
    assert type(out).__name__ == "UNet2DConditionOutput" and isinstance(again, tuple)
    assert len(ov_unet._compiled) == 1 and ov_unet.calls == {"openvino": 2, "torch": 0}  # positional or keyword
    torch.testing.assert_close(again[0], out.sample)
    # same integers and scales; OpenVINO's bf16 float ops and FakeQuantize arithmetic flip codes at rounding
    # boundaries, which propagate through the 83 layers: measured 27 dB on this random-weight model
    assert sqnr_db(ref, out.sample) > 20
    assert ov_unet.config is unet.config and ov_unet.dtype == unet.dtype


def test_falls_back_to_pytorch_with_a_reason(w8a8_tiny, monkeypatch, caplog):
    unet = w8a8_tiny.unet
    x, t, ehs = _probe()
    ov_unet = OpenVINOModule(unet)
    with torch.no_grad():
        ref = unet(x, t, ehs).sample
    with caplog.at_level(logging.INFO, logger="quantune"):
        out = ov_unet(x, t, ehs).sample  # gradients on: PyTorch (its fake-quantized forward)
    assert torch.equal(out, unet(x, t, ehs).sample) and "gradients are on" in caplog.text
    import openvino as ov

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported op")

    monkeypatch.setattr(ov, "convert_model", broken)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="quantune"):
        out = ov_unet(x, t, ehs).sample
    assert torch.equal(out, ref) and "could not convert" in caplog.text and "unsupported op" in caplog.text


class _Scaled(nn.Module):
    """An integer layer times a Python float `multiplier` (what a LoRA strength is to a trace)."""

    def __init__(self, layer) -> None:
        super().__init__()
        self.layer, self.multiplier = layer, 1.0

    def forward(self, x):
        return self.layer(x) * self.multiplier


def test_a_new_strength_or_new_weights_convert_again():
    q, x = _layer("linear", 8, True, 8)
    model = _Scaled(q)
    deployed = OpenVINOModule(model)
    with torch.no_grad():
        one = deployed(x)
        model.multiplier = 2.0
        two = deployed(x)
        q.bias.add_(1.0)  # in place: a new version of the tensor
        shifted = deployed(x)
    assert len(deployed._compiled) == 3 and deployed.calls == {"openvino": 3, "torch": 0}
    torch.testing.assert_close(two, 2 * one, rtol=0.02, atol=0.02)
    torch.testing.assert_close(shifted, two + 2.0, rtol=0.02, atol=0.05)
    deployed.reset()
    assert not deployed._compiled
