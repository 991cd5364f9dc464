"""The activation quantizers' one observation protocol (quant/act.py): the integer model's ActQuantizer and PTQ's
LSQActQuantizer share the base, observe through the same driver, and refuse what they cannot fix."""

from __future__ import annotations

import pytest
import torch

from quantune.errors import QuantuneError
from quantune.ptq.act_lsq import LSQActQuantizer
from quantune.quant.act import ActQuantBase, ActQuantizer, observe_activations


def test_both_quantizers_follow_the_protocol():
    x = torch.randn(4, 6, 5, 5, generator=torch.Generator().manual_seed(0)) * 2
    fixed, lsq = ActQuantizer(8, split=2), LSQActQuantizer(8, split=2)
    assert isinstance(fixed, ActQuantBase) and isinstance(lsq, ActQuantBase)
    assert observe_activations({"a": fixed, "b": lsq}, lambda: (fixed(x), lsq(x))) == []
    assert bool(fixed.calibrated) and lsq.seen and not fixed.observing and not lsq.observing
    with torch.no_grad():  # one batch: both searched the same range (L2.4 on the same values)
        torch.testing.assert_close(lsq.to_act_quantizer()(x), fixed(x), rtol=0, atol=float(fixed.scale.max()))


def test_unseen_quantizers_are_named_and_left_unfixed():
    seen, unseen = ActQuantizer(8), ActQuantizer(8)
    assert observe_activations({"seen": seen, "unseen": unseen}, lambda: seen(torch.ones(3))) == ["unseen"]
    assert not bool(seen.calibrated) and not seen.observing and not seen.seen
    with pytest.raises(QuantuneError, match="saw no input"):
        unseen.finish_observing()


def test_lsq_refuses_a_nan_range():
    q = LSQActQuantizer(8)
    with pytest.raises(QuantuneError, match="NaN/inf"):
        observe_activations({"q": q}, lambda: q(torch.tensor([0.0, float("nan"), 1.0])))
    assert not q.observing
