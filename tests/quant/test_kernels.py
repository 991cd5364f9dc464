"""Integer kernels vs the fake-quantized reference forward (same integers, float arithmetic)."""

import pytest
import torch
from torch import nn

from quantune.quant import calibrate, from_float
from quantune.quant.kernels import onednn_available, prepare_int_kernels, unsupported_reason
from quantune.quant.primitives import sqnr_db

BACKENDS = ["int_mm"] + (["onednn"] if onednn_available() else [])
LAYERS = {
    "linear": (lambda: nn.Linear(64, 48), (3, 10, 64)),
    "conv3x3": (lambda: nn.Conv2d(16, 24, 3, padding=1), (2, 16, 9, 9)),
    "conv3x3_stride2": (lambda: nn.Conv2d(16, 24, 3, stride=2, padding=1), (2, 16, 9, 9)),
    "conv1x1": (lambda: nn.Conv2d(16, 24, 1), (2, 16, 9, 9)),
}


def _quantized(kind: str, bits: int, symmetric: bool, device="cpu"):
    torch.manual_seed(0)
    make, shape = LAYERS[kind]
    layer = make()
    x = torch.randn(*shape) * 2 + 0.5
    q = from_float(layer, bits, symmetric=symmetric, act_bits=8).to(device)
    x = x.to(device)
    calibrate(q, lambda: q(x))
    return layer, q, x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("bits,symmetric", [(8, True), (4, False), (8, False)])
def test_kernel_matches_fake_quantization(backend, kind, bits, symmetric):
    _, q, x = _quantized(kind, bits, symmetric)
    with torch.no_grad():
        ref = q(x)
        ways = prepare_int_kernels(q, backend)
        assert ways == {f"int8 ({backend})": 1}
        out = q(x)
    w = q.int_weight()
    if bits == 8 and not symmetric:  # q - z in [-255, 255]: int8 product with q - 128 plus the row term
        assert int(w.abs().max()) > 128 and q.kernel.row_offset is not None
    assert out.shape == ref.shape and out.dtype == ref.dtype
    # same integers, only float summation order differs: better than 60 dB (float32 rounding)
    assert sqnr_db(ref, out) > 60


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("symmetric", [True, False])
def test_split_activation_kernel(backend, kernel, symmetric):
    """concat(h, skip) with one activation quantizer per part (the shortcut split): two integer products summed."""
    from quantune.quant.layers import ActQuantizer, from_codes
    from quantune.quant.primitives import quantize, search_qparams

    torch.manual_seed(0)
    conv = nn.Conv2d(24, 16, kernel, padding=kernel // 2)
    x = torch.cat([torch.randn(2, 10, 7, 7) * 5, torch.randn(2, 14, 7, 7) * 0.3 + 1], 1)  # parts of unlike ranges
    rows = conv.weight.detach().reshape(16, -1)
    qp = search_qparams(rows, 8, per_channel=True, symmetric=symmetric)
    q = from_codes(conv, quantize(rows, qp), qp, act_quant=ActQuantizer(8, split=10))
    calibrate(q, lambda: q(x))
    with torch.no_grad():
        ref = q(x)
        assert prepare_int_kernels(q, backend) == {f"int8 ({backend})": 1}
        out = q(x)
    assert sqnr_db(ref, out) > 60


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False), (4, False)])
def test_split_weight_kernel(backend, kernel, bits, symmetric):
    """The shortcut split of the weight too (EDA-DM's reference): each part's product with its own weight grid."""
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 16, kernel, padding=kernel // 2)
    with torch.no_grad():
        conv.weight[:, 10:] *= 0.05  # the skip's weights far smaller than h's: one grid per row would waste them
    x = torch.cat([torch.randn(2, 10, 7, 7) * 5, torch.randn(2, 14, 7, 7) * 0.3 + 1], 1)
    q = from_float(conv, bits, symmetric=symmetric, act_bits=8, split=10)
    calibrate(q, lambda: q(x))
    assert q.weight_split == 10 and q.scale.shape == (16, 2) and q.act_quant.split == 10
    with torch.no_grad():
        ref = q(x)
        assert prepare_int_kernels(q, backend) == {f"int8 ({backend})": 1}
        out = q(x)
    assert sqnr_db(ref, out) > 60  # same integers, float summation order only
    one = from_float(conv, bits, symmetric=symmetric)
    w = conv.weight.detach()
    assert sqnr_db(w[:, 10:], q.dequantize()[:, 10:]) > sqnr_db(w[:, 10:], one.dequantize()[:, 10:]) + 10
    merged = q.with_weight(w * 1.01)  # the QLoRA + PTQ merge keeps the layer's grids and input quantizer
    assert merged.weight_split == 10 and merged.scale.shape == (16, 2) and merged.act_quant is q.act_quant
    assert sqnr_db(w * 1.01, merged.dequantize()) > sqnr_db(w * 1.01, one.with_weight(w * 1.01).dequantize())
    other = from_float(conv, bits, symmetric=symmetric, act_bits=8, split=12)
    other.act_quant = q.act_quant  # its input split at channel 10: no kernel pairs the parts
    assert unsupported_reason(other) == "weight split at another channel than its input"


def test_unsupported_layers_fall_back_and_are_counted():
    from quantune.quant.layers import from_int

    conv, q8asym, x = _quantized("conv3x3", 8, False)
    wide = from_int(conv, q8asym.int_weight() * 3, q8asym.scale / 3, bits=8, act_quant=q8asym.act_quant)
    assert unsupported_reason(wide) == "weight integers beyond int8"  # e.g. an IntLoRA W8 merge: no row split
    w_only = from_float(nn.Linear(8, 8), 4)
    assert unsupported_reason(w_only) == "weight-only"
    model = nn.Sequential(wide)
    with torch.no_grad():
        ref = model(x)
        ways = prepare_int_kernels(model)
        assert ways == {"dequantized (weight integers beyond int8)": 1}
        assert torch.equal(model(x), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", list(LAYERS))
def test_kernel_matches_fake_quantization_cuda(kind):
    _, q, x = _quantized(kind, 8, True, device="cuda")
    with torch.no_grad():
        ref = q(x)
        prepare_int_kernels(q, "int_mm")
        out = q(x)
    assert sqnr_db(ref, out) > 50


def test_fused_attention_matches_unfused():
    """The deployed attention (one SDPA on the quantized q, k, v; P unquantized) against the calibrated form
    (8-bit P, float bmm): only P's rounding differs."""
    from diffusers.models.attention_processor import Attention

    from quantune.quant.attention import QuantAttnProcessor
    from quantune.quant.kernels import drop_int_kernels, prepare_attention

    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=4, dim_head=8, cross_attention_dim=16)
    attn.set_processor(QuantAttnProcessor(8))
    x, ctx = torch.randn(2, 64, 32), torch.randn(2, 7, 16)
    calibrate(attn, lambda: attn(x, ctx))
    with torch.no_grad():
        ref = attn(x, ctx)
        assert prepare_attention(attn, "fp32") == 1
        fused = attn(x, ctx)
        drop_int_kernels(attn)
        assert torch.equal(attn(x, ctx), ref)
    assert sqnr_db(ref, fused) > 30  # 8-bit P over 7 keys; measured 51 dB
