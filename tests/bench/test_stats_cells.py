"""The table helpers: mean +- sd, the paired permutation test, and the resumable cell cache."""

import math

import pytest

from quantune.bench.cells import CellCache
from quantune.bench.common import override
from quantune.bench.stats import format_ms, mean_sd, paired_p
from quantune.errors import QuantuneError


def test_mean_sd_skips_nan_and_uses_n_minus_1():
    assert mean_sd([1.0, 3.0, float("nan")]) == (2.0, math.sqrt(2.0))
    assert mean_sd([5.0]) == (5.0, 0.0)
    assert all(math.isnan(v) for v in mean_sd([float("nan")]))
    assert format_ms([1.0, 3.0], 1) == "2.0 ± 1.4" and format_ms([2.0], 2) == "2.00" and format_ms([], 1) == "-"


def test_paired_p_separates_a_shift_from_noise():
    noise = [((i * 37) % 11 - 5) / 10 for i in range(60)]  # mean about 0, paired items
    shifted = [v + 0.5 for v in noise]
    assert paired_p(shifted, noise) < 0.001  # a constant shift on every item
    mixed = [v + (0.3 if i % 2 else -0.3) for i, v in enumerate(noise)]
    assert paired_p(mixed, noise) > 0.5  # +- the same amount: no mean difference
    assert paired_p(noise, noise) == 1.0
    with pytest.raises(ValueError):
        paired_p([1.0], [1.0, 2.0])


def test_cell_cache_reuses_only_cells_of_the_same_settings(tmp_path):
    cache = CellCache(tmp_path / "t", {"n": 2})
    assert cache.get("W8A8_minmax_s0") is None
    cache.put("W8A8_minmax_s0", {"fid": 1.5})
    assert cache.get("W8A8_minmax_s0") == {"fid": 1.5}
    assert CellCache(tmp_path / "t", {"n": 3}).get("W8A8_minmax_s0") is None  # other settings: run again
    assert not list((tmp_path / "t").glob("*.tmp"))
    with pytest.raises(QuantuneError, match="cell key"):
        cache.path("../x")


def test_a_resumed_table_counts_the_cells_of_earlier_runs(tmp_path):
    first = CellCache(tmp_path / "t", {"n": 2})
    first.put("a", {"fid": 1.0}, seconds=60.0)
    first.put("b", {"fid": 2.0})  # written before cells kept their seconds
    assert first.get("a") == {"fid": 1.0} and first.earlier()["cells"] == 0  # this process's own cells
    resumed = CellCache(tmp_path / "t", {"n": 2})
    assert resumed.get("a") and resumed.get("b") and resumed.get("a")  # read twice, counted once
    resumed.put("c", {"fid": 3.0}, seconds=5.0)
    assert resumed.earlier() == {"cells": 2, "timed_cells": 1, "seconds": 60.0}


def test_ptq_table_settings_take_a_stated_smaller_run(monkeypatch):
    from quantune.bench import quality_ptq as q

    monkeypatch.setenv(q.SETTINGS_VARIABLE, "calib_samples=64, iters=100,seeds=2")
    s = q.settings(quick=False)
    assert (s.n, s.steps, s.calib_samples, s.iters, s.seeds) == (200, 20, 64, 100, 2) and isinstance(s.iters, int)
    for bad in ("iters", "lr=1", "iters=x"):
        with pytest.raises(ValueError):
            override(s, bad, q.SETTINGS_VARIABLE)
