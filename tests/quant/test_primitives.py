"""Quantization primitives against float: SQNR thresholds, the L2.4 search, STE gradients, int4 packing, bad bits."""

from __future__ import annotations

import pytest
import torch

from quantune.errors import QuantuneError
from quantune.quant.primitives import (
    check_bits,
    dequantize,
    fake_quantize,
    pack_int4,
    quantize,
    search_qparams,
    sqnr_db,
    unpack_int4,
)


@pytest.fixture
def w():
    return torch.randn(128, 256, generator=torch.Generator().manual_seed(0)) * 0.05


def _sqnr(x, bits, **kw):
    qp = search_qparams(x, bits, **kw)
    return sqnr_db(x, dequantize(quantize(x, qp), qp))


@pytest.mark.parametrize(("bits", "floor_db"), [(8, 40.0), (6, 28.0), (4, 17.0), (2, 5.0)])
def test_per_channel_sqnr_against_float(w, bits, floor_db):
    # a uniform b-bit quantizer of a Gaussian gains about 6 dB per bit; the floors leave a few dB of margin
    assert _sqnr(w, bits) > floor_db


def test_l24_search_beats_minmax_at_low_bits(w):
    assert _sqnr(w, 2, search="l2.4") > _sqnr(w, 2, search="minmax") + 1.0
    assert _sqnr(w, 4, search="l2.4") >= _sqnr(w, 4, search="minmax")


def test_symmetric_per_tensor_and_per_channel(w):
    sym = search_qparams(w, 8, symmetric=True)
    assert sym.zero_point is None and quantize(w, sym).abs().max() <= 127
    per_tensor = search_qparams(w, 8, per_channel=False)
    assert per_tensor.scale.shape == (1, 1)
    assert _sqnr(w * torch.linspace(0.1, 10, 128)[:, None], 8) > _sqnr(
        w * torch.linspace(0.1, 10, 128)[:, None], 8, per_channel=False
    )


def test_midrise_grid_has_no_zero_level(w):
    qp = search_qparams(w, 4, offset=0.5)
    assert (dequantize(quantize(w, qp), qp) != 0).all()
    assert sqnr_db(w, dequantize(quantize(w, qp), qp)) > 15.0


def test_fake_quantize_forward_and_straight_through_gradient():
    x = torch.linspace(-2, 2, 101, requires_grad=True)
    qp = search_qparams(torch.linspace(-1, 1, 101), 4, per_channel=False, search="minmax")
    y = fake_quantize(x, qp)
    assert torch.allclose(y, dequantize(quantize(x.detach(), qp), qp))
    y.sum().backward()
    inside = (x.detach() >= -1.0) & (x.detach() <= 1.0)
    assert torch.equal(x.grad[inside], torch.ones(int(inside.sum())))  # STE: identity inside the range
    assert (x.grad[(x.detach() < -1.2) | (x.detach() > 1.2)] == 0).all()  # clamp: zero outside


def test_int4_packing_round_trip_and_range():
    codes = torch.randint(0, 16, (7, 33), generator=torch.Generator().manual_seed(1))
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 17)
    assert torch.equal(unpack_int4(packed, 33).long(), codes)
    with pytest.raises(QuantuneError, match="0 to 15"):
        pack_int4(torch.tensor([16]))


@pytest.mark.parametrize("bits", [0, 1, 9, True, 4.0])
def test_unsupported_bits_are_refused(bits):
    with pytest.raises(QuantuneError, match="not supported: use an integer from 2 to 8"):
        check_bits(bits)


def test_sample_values_is_not_strided():
    """A strided sample of an NCHW tensor can line up with one column; the random sample sees every value."""
    from quantune.quant.primitives import sample_values

    x = torch.zeros(1 << 20)
    x[1::2] = 1.0  # every other element: a stride-2 slice would see only zeros
    s = sample_values(x, 1 << 16)
    assert s.numel() == 1 << 16 and 0.45 < float(s.mean()) < 0.55
    assert torch.equal(s, sample_values(x, 1 << 16))  # seeded
    assert torch.equal(sample_values(x[:100], 1 << 16), x[:100])  # small tensors whole


def test_grouped_search_is_the_search_of_each_part():
    from quantune.quant.primitives import per_column, search_grouped, split_groups

    w = torch.randn(6, 5, 3, 3)  # conv rows of 5 input channels x 9 taps
    rows = w.reshape(6, -1)
    groups = split_groups(rows.shape[1], 5, 2)
    assert groups == (18, 27) and split_groups(45, 5, 0) is None
    qp = search_grouped(rows, 4, groups)
    for i, part in enumerate((rows[:, :18], rows[:, 18:])):
        one = search_qparams(part, 4)
        assert torch.equal(qp.scale[:, i : i + 1], one.scale)
        assert torch.equal(qp.zero_point[:, i : i + 1], one.zero_point)
    spread = per_column(qp.scale, groups)
    assert spread.shape == rows.shape
    assert torch.equal(spread[:, 17], qp.scale[:, 0]) and torch.equal(spread[:, 18], qp.scale[:, 1])
    with pytest.raises(QuantuneError, match="empty part"):
        split_groups(45, 5, 5)
