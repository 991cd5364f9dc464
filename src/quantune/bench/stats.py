"""Summaries over repeated runs: mean +- sd, and a paired test between two variants scored on the same items.

The paired test is a sign-flip permutation test of the mean difference (Fisher's randomization test): under the
null hypothesis that the two variants are exchangeable on each item, every difference d_i is as likely to be -d_i,
so the two-sided p value is the share of random sign assignments whose |mean| reaches the observed one. It needs no
distributional assumption and no scipy (not a dependency of quantune), which is why it is written here.
"""

from __future__ import annotations

import math

import torch


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value) of the finite values; NaN when none is."""
    finite = [float(v) for v in values if math.isfinite(float(v))]
    if not finite:
        return float("nan"), float("nan")
    mean = sum(finite) / len(finite)
    sd = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)) if len(finite) > 1 else 0.0
    return mean, sd


def paired_p(a: list[float], b: list[float], draws: int = 20000, seed: int = 0) -> float:
    """Two-sided p value of mean(a - b) != 0 by the sign-flip permutation test (items paired by position)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"a paired test needs two equally long, non-empty lists (got {len(a)} and {len(b)})")
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    observed = d.mean().abs()
    if observed == 0:
        return 1.0
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (draws, d.numel()), generator=g, dtype=torch.float64) * 2 - 1
    extreme = ((signs * d).mean(dim=1).abs() >= observed - 1e-12).sum().item()
    return (extreme + 1) / (draws + 1)  # the observed assignment counts as one draw: p is never 0


def format_ms(values: list[float], digits: int) -> str:
    """'mean +- sd' of repeated runs ('-' when none is finite; the mean alone for one run)."""
    mean, sd = mean_sd(values)
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {sd:.{digits}f}"
