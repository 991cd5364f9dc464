"""Integer layers: real storage (and its memory), outputs against float, save/load, calibration, QLoRA bases."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from quantune.errors import QuantuneError
from quantune.quant import ActQuant, QuantConfig, WeightQuant, calibrate, quantize_
from quantune.quant.layers import QuantConv2d, QuantLinear, from_float
from quantune.quant.primitives import sqnr_db
from quantune.quant.quantize import SPEC_VERSION, _read_spec, load_quantized_model, save_quantized_model, weight_memory

torch.manual_seed(0)


@pytest.mark.parametrize(("bits", "floor_db"), [(8, 35.0), (4, 14.0)])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_outputs_against_float(kind, bits, floor_db):
    layer = nn.Linear(96, 48) if kind == "linear" else nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(4, 96) if kind == "linear" else torch.randn(2, 8, 9, 9)
    q = from_float(layer, bits)
    assert isinstance(q, QuantLinear if kind == "linear" else QuantConv2d)
    with torch.no_grad():
        assert sqnr_db(layer(x), q(x)) > floor_db
    assert q.qweight.dtype == torch.uint8
    assert q.qweight.shape[1] == (q.cols + 1) // 2 if bits == 4 else q.cols  # two 4-bit codes per byte


def test_backward_recomputes_the_weight_and_matches_float():
    layer = from_float(nn.Linear(32, 16), 8)
    x = torch.randn(5, 32, requires_grad=True)
    layer(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    nn.functional.linear(x2, layer.dequantize(), layer.bias).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_only_unet_holds_about_b_over_32_of_fp32(bits):
    from quantune.models import build_tiny

    unet = build_tiny().unet
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    fp32 = sum(m.weight.numel() * 4 for m in layers.values())
    rows = sum(m.weight.shape[0] for m in layers.values())
    quantize_(unet, QuantConfig(WeightQuant(bits, search="minmax")))
    held = weight_memory(unet)["integer"]
    overhead = rows * 8  # an fp32 scale and an int32 zero point per row
    codes = held - overhead
    # measured: the codes are b/32 of the fp32 weights (4-bit rows with an odd length pad one nibble)
    assert bits / 32 <= codes / fp32 < bits / 32 * 1.01, (codes, fp32)
    assert held / fp32 < bits / 32 + 0.07  # plus the scales: still far below fp32
    assert not any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in unet.modules())


def test_save_load_round_trip_is_exact(tmp_path):
    from diffusers import UNet2DConditionModel

    from quantune.models import build_tiny

    unet = build_tiny().unet
    quantize_(unet, QuantConfig(WeightQuant(4), ActQuant(8)))
    x, c = torch.randn(1, 4, 8, 8), torch.randn(1, 77, unet.config.cross_attention_dim)
    with pytest.raises(QuantuneError, match="not calibrated"):
        unet(x, 10, c)
    assert calibrate(unet, lambda: unet(x, 10, c)) > 0
    save_quantized_model(unet, tmp_path / "unet")
    loaded = load_quantized_model(tmp_path / "unet", UNet2DConditionModel)
    with torch.no_grad():
        assert torch.equal(unet(x, 10, c).sample, loaded(x, 10, c).sample)
    spec = tmp_path / "unet" / "quantune_quant.json"
    spec.write_text(spec.read_text().replace('"packed": true', '"packed": false', 1))
    with pytest.raises(QuantuneError, match="does not match its quantune_quant.json"):
        load_quantized_model(tmp_path / "unet", UNet2DConditionModel)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda meta: meta.update(version=99), "spec version 99, written by a newer quantune"),
        (lambda meta: meta.update(version="2"), "no valid spec version"),
        (lambda meta: meta.update(format="quantune-lora"), "not a quantune integer model"),
        (lambda meta: meta.pop("layers"), "is unreadable"),
        (lambda meta: meta.update(layers=[]), "not a mapping"),
        (lambda meta: meta.update(version=True), "no valid spec version"),
        (lambda meta: meta.update(version=1), None),  # the first layout still loads
    ],
)
def test_spec_format_and_version_are_checked(tmp_path, edit, message):
    """quantune_quant.json names its format and layout version: another file, a later version or a broken one is
    refused with the fix; an earlier version loads."""
    spec = tmp_path / "quantune_quant.json"
    meta = {"format": "quantune-int", "version": SPEC_VERSION, "layers": {}, "attention": {}}
    edit(meta)
    spec.write_text(json.dumps(meta))
    if message is None:
        assert _read_spec(spec)[0] == {}
    else:
        with pytest.raises(QuantuneError, match=message):
            _read_spec(spec)


def test_bad_targets_and_bits():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(QuantuneError, match="only nn.Linear and nn.Conv2d"):
        quantize_(model, QuantConfig(targets=["1"]))
    with pytest.raises(QuantuneError, match="from 2 to 8"):
        QuantConfig(WeightQuant(bits=1))
    with pytest.raises(QuantuneError, match="from 2 to 8"):
        QuantConfig(WeightQuant(bits=12))


def test_lora_on_an_integer_base_trains_only_the_lora():
    from quantune.lora import LoraConfig, add_lora, lora_parameters

    model = nn.Sequential(nn.Linear(16, 16))
    add_lora(model, LoraConfig(r=2, targets=["0"]))
    quantize_(model, QuantConfig(WeightQuant(4), targets=r".*\.base_layer"))
    layer = model[0]
    assert isinstance(layer.base_layer, QuantLinear) and layer.quantized_base
    with torch.no_grad():
        layer.lora_up.weight.normal_()
    model(torch.randn(3, 16)).sum().backward()
    assert all(p.grad is not None for p in lora_parameters(model))
    assert layer.get_delta_weight().shape == (16, 16)
    with pytest.raises(QuantuneError, match="qlora merge"):
        layer.merge()


def test_quant_config_short_spelling():
    """docs/intlora.md's QuantConfig(bits=..., act_bits=...) is the shared vocabulary's WeightQuant / ActQuant."""
    from quantune.quant import ActQuant, WeightQuant

    assert QuantConfig(bits=4, act_bits=8) == QuantConfig(WeightQuant(4), ActQuant(8))
    assert QuantConfig(bits=4).act is None
    with pytest.raises(QuantuneError, match="must be a WeightQuant"):
        QuantConfig(weight=4)
