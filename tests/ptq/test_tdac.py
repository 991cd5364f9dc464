"""TDAC (ptq/tdac.py): density, variety and sample counts on a feature sequence whose answer is known by hand."""

from __future__ import annotations

import pytest
import torch

from quantune.errors import QuantuneError
from quantune.ptq.tdac import sample_counts, tdac_scores, tdac_weights, uniform_counts


def _features() -> torch.Tensor:
    """5 steps, 1 sample, 2 channels, 1 pixel: steps 0-3 at (1, 0), step 4 at (0, 1).
    d(s, s') is 0 inside the cluster and 1 to step 4; cos is 1 inside, 0 to step 4."""
    f = torch.zeros(5, 1, 2, 1)
    f[:4, 0, 0, 0] = 1.0
    f[4, 0, 1, 0] = 1.0
    return f


def test_density_and_variety_by_hand():
    density, variety = tdac_scores(_features(), r=0.5)
    assert density.tolist() == [3, 3, 3, 3, 0]  # four typical steps, one outlier
    assert variety.tolist() == pytest.approx([1, 1, 1, 1, 4])  # sum of (1 - cos) over the other steps


def test_weights_and_counts_by_hand():
    w = tdac_weights(_features(), r=0.5, lam=2.0)
    assert w.tolist() == pytest.approx([1, 1, 1, 1, 2])  # norm(D) + 2 norm(V)
    assert sample_counts(w, 12) == [2, 2, 2, 2, 4]  # 12 w_s / sum w, exact here


def test_radius_changes_density():
    density, _ = tdac_scores(_features(), r=2.0)  # every pair is within r: all steps equally dense
    assert density.tolist() == [4] * 5


def test_counts_repair_to_the_total():
    assert sample_counts(torch.tensor([0.5, 0.25, 0.25]), 7) == [3, 2, 2]  # rounds to 8, one taken back
    assert uniform_counts(4, 10) == [3, 3, 2, 2]  # rounds to 8, the two largest remainders get one more
    assert sample_counts(torch.zeros(3), 6) == [2, 2, 2]  # all steps alike: uniform
    for n in (20, 33, 256):
        counts = sample_counts(torch.rand(20, generator=torch.Generator().manual_seed(n)), n)
        assert sum(counts) == n and min(counts) >= 0


def test_bad_feature_shape():
    with pytest.raises(QuantuneError, match="steps, samples, channels"):
        tdac_scores(torch.zeros(5, 3), r=1.0)
