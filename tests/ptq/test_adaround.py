"""AdaRound (ptq/adaround.py): initial soft weights, hard rounding, the regulariser and its beta schedule."""

from __future__ import annotations

import pytest
import torch

from quantune.ptq.adaround import AdaRoundQuantizer, beta_schedule


@pytest.mark.parametrize("bits,symmetric", [(8, True), (4, False)])
def test_hard_rounding_starts_at_nearest(bits, symmetric):
    w = torch.randn(16, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    q = AdaRoundQuantizer(w, bits, symmetric)
    rows = w.reshape(16, -1)
    z = q.qp.zero_point if q.qp.zero_point is not None else 0
    nearest = torch.clamp(torch.round(rows / q.qp.scale) + z, q.qp.qmin, q.qp.qmax)
    soft = q().detach()  # h(V) = frac(W / s) (clamped to [0.01, 0.99]): W itself where it lies inside the grid's range
    inside = (nearest > q.qp.qmin) & (nearest < q.qp.qmax)
    err = (soft.reshape(16, -1) - rows).abs()[inside]
    assert float(err.max()) <= 0.011 * float(q.qp.scale.max())
    assert torch.equal(q.hard_codes(), nearest)  # 1[V >= 0] = 1[frac >= 0.5]: round to nearest
    assert q.hard


def test_hard_rounding_follows_v():
    w = torch.randn(8, 20, generator=torch.Generator().manual_seed(1))
    q = AdaRoundQuantizer(w, 4, symmetric=False)
    floor = torch.clamp(q.w_floor + q.qp.zero_point, q.qp.qmin, q.qp.qmax)
    ceil = torch.clamp(q.w_floor + 1 + q.qp.zero_point, q.qp.qmin, q.qp.qmax)
    with torch.no_grad():
        q.v.fill_(-5.0)
    assert torch.equal(q.hard_codes(), floor)
    with torch.no_grad():
        q.v.fill_(5.0)
    assert torch.equal(q.hard_codes(), ceil)
    q.hard = False  # soft h saturates at 0 / 1 beyond |V| ~ 2.4 (the rectified sigmoid's stretch)
    assert torch.equal(q.codes(), ceil)


def test_regularizer_and_beta():
    q = AdaRoundQuantizer(torch.randn(4, 8, generator=torch.Generator().manual_seed(2)), 4, symmetric=False)
    with torch.no_grad():
        q.v.fill_(10.0)
    assert float(q.regularizer(2.0).detach()) == pytest.approx(0.0)  # h = 1 everywhere: no penalty
    with torch.no_grad():
        q.v.fill_(0.0)  # h = 0.5: the full penalty 1 per weight
    assert float(q.regularizer(2.0).detach()) == pytest.approx(32.0)
    assert beta_schedule(0, 100) is None and beta_schedule(19, 100) is None  # warm-up: regulariser off
    assert beta_schedule(20, 100) == pytest.approx(20.0)
    assert beta_schedule(100, 100) == pytest.approx(2.0)
    assert 2.0 < beta_schedule(60, 100) < 20.0


@pytest.mark.parametrize("symmetric", [True, False])
def test_nearest_quantizer_is_adaround_hard_at_its_start(symmetric):
    """minmax's round-to-nearest (no V, no weight copy) gives AdaRound's codes before any learning."""
    from torch import nn

    from quantune.ptq.adaround import NearestQuantizer

    layer = nn.Linear(24, 8)
    ada = AdaRoundQuantizer(layer.weight, 4, symmetric)
    near = NearestQuantizer(layer, 4, symmetric)
    assert torch.equal(near.hard_codes(), ada.hard_codes())
    ada.hard = True
    assert torch.equal(near(), ada())
    assert not list(near.parameters()) and near.qp.bits == 4


@pytest.mark.parametrize("symmetric", [True, False])
def test_split_grids_are_each_parts_own(symmetric):
    """groups (the shortcut split of the weight): the codes of each part are those of a quantizer on that part
    alone, for AdaRound (at its start) and round-to-nearest alike; the grid is stored [C_out, 2]."""
    from torch import nn

    from quantune.ptq.adaround import NearestQuantizer
    from quantune.quant.primitives import split_groups

    conv = nn.Conv2d(6, 5, 3)
    with torch.no_grad():
        conv.weight[:, 2:] *= 0.01  # the skip part's weights far smaller
    groups = split_groups(54, 6, 2)
    ada, near = (
        AdaRoundQuantizer(conv.weight, 4, symmetric, groups=groups),
        NearestQuantizer(conv, 4, symmetric, groups=groups),
    )
    assert ada.qp.scale.shape == near.qp.scale.shape == (5, 2)
    parts = [AdaRoundQuantizer(conv.weight[:, :2], 4, symmetric), AdaRoundQuantizer(conv.weight[:, 2:], 4, symmetric)]
    expected = torch.cat([p.hard_codes() for p in parts], 1)
    assert torch.equal(ada.hard_codes(), expected) and torch.equal(near.hard_codes(), expected)
    ada.hard = True
    assert torch.equal(near(), ada()) and near().shape == conv.weight.shape
