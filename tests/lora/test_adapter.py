"""The adapter seam: adapters on integer bases (applied from a file, merged by re-quantization), the canonical
weights' read-time consistency check for every format, and the type registry's refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantune.errors import QuantuneError
from quantune.formats import WRITABLE, read_lora, write_lora
from quantune.lora import LoraModule, apply_lora, get_lora_weights, lora_layers, merge_into
from quantune.lora.adapter import group_by_module, module_from_kohya
from quantune.quant.config import QuantConfig
from quantune.quant.layers import QuantLinear, from_float
from quantune.quant.quantize import quantize_


def _lora(out_f: int, in_f: int, r: int = 4, seed: int = 0) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    return LoraModule(down=torch.randn(r, in_f, generator=g), up=torch.randn(out_f, r, generator=g) * 0.1, alpha=2.0)


def test_lora_on_an_integer_linear_adds_its_branch():
    base = from_float(nn.Linear(16, 8), 8)
    mod = _lora(8, 16)
    layer = mod.layer(base)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    expected = base(x) + (x @ mod.down.T @ mod.up.T) * mod.scale
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    assert layer.quantized_base


def test_merge_into_an_integer_base_requantizes():
    model = nn.Sequential(from_float(nn.Linear(16, 8), 8))
    base, mod = model[0], _lora(8, 16)
    target = base.dequantize() + mod.delta()
    assert merge_into(model, [({"unet.0": mod}, 1.0)]) == 1
    merged = model[0]
    assert isinstance(merged, QuantLinear) and merged is not base and merged.bits == 8
    step = merged.scale.max()  # the merged weight is W + dW up to half a quantization step per entry
    assert (merged.dequantize() - target).abs().max() <= step / 2 + 1e-6
    with pytest.raises(QuantuneError, match="qlora merge"):
        mod.layer(merged).merge()  # in place: refused, with the two commands that do it


def test_a_lora_file_applies_to_and_merges_into_an_integer_model(lora_pipe, tmp_path):
    from quantune.models import build_tiny

    path = write_lora(get_lora_weights(lora_pipe), tmp_path / "l.safetensors", "kohya")
    tiny = build_tiny()
    quantize_(tiny.unet, QuantConfig(bits=8))
    weights, _, _ = read_lora(path, tiny)
    unet_keys = [k for k in weights if k.startswith("unet.")]
    apply_lora(tiny, weights)
    assert len(lora_layers(tiny.unet)) == len(unet_keys) and all(
        layer.quantized_base for layer in lora_layers(tiny.unet).values()
    )
    from quantune.lora import remove_lora
    from quantune.quant.quantize import quant_layers

    remove_lora(tiny.unet)
    remove_lora(tiny.text_encoder)
    before = len(quant_layers(tiny.unet))
    assert merge_into(tiny, [(weights, 1.0)]) == len(weights)
    assert len(quant_layers(tiny.unet)) == before  # every merged base is an integer layer again


@pytest.mark.parametrize("fmt", WRITABLE)
def test_every_reader_refuses_factors_that_contradict_each_other(fmt, tiny, tmp_path):
    bad = LoraModule(down=torch.zeros(4, 32), up=torch.zeros(32, 3), alpha=4.0)  # ranks 4 and 3
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    path = write_lora({key: bad}, tmp_path / (fmt if fmt == "peft" else f"{fmt}.safetensors"), fmt)
    with pytest.raises(QuantuneError, match="contradict"):
        read_lora(path, tiny)


def test_registry_groups_by_suffix_and_names_unknown_layouts():
    mod = _lora(8, 16)
    sd = {f"m.x.{s}": t for s, t in mod.kohya_tensors().items()}
    assert set(group_by_module(sd)) == {"m.x"}
    back = module_from_kohya(group_by_module(sd)["m.x"], "m.x")
    assert torch.equal(back.delta(), mod.delta())
    with pytest.raises(QuantuneError, match="no adapter type"):
        module_from_kohya({"oft_blocks": torch.zeros(2, 2)}, "m.y")  # LyCORIS's OFT: not read
    with pytest.raises(QuantuneError, match="m.y: LoHa factor.*missing"):
        module_from_kohya({"hada_w1_a": torch.zeros(2, 2)}, "m.y")


def test_merge_keeps_the_integer_layers_grid_and_packing():
    """A symmetric int8 layer (PTQ's W8) stays symmetric int8, a packed 4-bit one stays packed 4-bit."""
    for bits, symmetric in ((8, True), (4, False)):
        model = nn.Sequential(from_float(nn.Linear(16, 8), bits, symmetric=symmetric))
        before = model[0]
        merge_into(model, [({"unet.0": _lora(8, 16)}, 1.0)])
        after = model[0]
        assert (after.zero_point is None) == symmetric and after.packed == before.packed and after.bits == bits
        assert after.qweight.dtype == before.qweight.dtype


@pytest.mark.parametrize("alpha", [float("nan"), float("inf")])
@pytest.mark.parametrize("fmt", WRITABLE)
def test_every_reader_refuses_an_alpha_that_is_not_a_number(fmt, alpha, tiny, tmp_path):
    bad = LoraModule(down=torch.zeros(4, 32), up=torch.zeros(32, 4), alpha=alpha)
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    path = write_lora({key: bad}, tmp_path / (fmt if fmt == "peft" else f"{fmt}.safetensors"), fmt)
    with pytest.raises(QuantuneError, match="alpha"):
        read_lora(path, tiny)
