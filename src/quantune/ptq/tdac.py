"""TDAC, Temporal Distribution Alignment Calibration (EDA-DM, arXiv 2401.04585, section 4.1;
docs/quantization.md).

From a feature map F_s recorded at every denoising step s of the FP sampler (the input of the mid-block attention):
    d(s, s') = mean((F_s - F_s')^2)
    D_s = #{s' != s : d(s, s') <= r}                                   (density: how typical step s is)
    V_s = sum_{s' != s} sum_{samples, pixels} (1 - cos(F_s, F_s'))      (variety, cosine along channels)
    w_s = norm(D_s) + lambda * norm(V_s),   norm = min-max normalisation to [0, 1]
    n_s = round(N w_s / sum w), repaired so that sum_s n_s = N
Q-Diffusion's baseline is `uniform_counts`: the same number of samples at every step.
"""

from __future__ import annotations

import torch

from quantune.errors import QuantuneError


def _minmax(x: torch.Tensor) -> torch.Tensor:
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else torch.zeros_like(x)


def tdac_scores(features: torch.Tensor, r: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(D, V): density and variety of each step; features [S, B, C, ...] (steps, samples, channels, pixels)."""
    if features.dim() < 3:
        raise QuantuneError("TDAC features must be [steps, samples, channels, ...]")
    f = features.detach().double()
    steps = f.shape[0]
    flat = f.reshape(steps, -1)
    sq = flat.pow(2).sum(1)
    dist = (sq[:, None] + sq[None, :] - 2 * flat @ flat.T).clamp_min(0) / flat.shape[1]
    off = ~torch.eye(steps, dtype=torch.bool)
    density = ((dist <= r) & off).sum(1).double()
    unit = torch.nn.functional.normalize(f.flatten(3) if f.dim() > 3 else f.unsqueeze(-1), dim=2)  # [S, B, C, P]
    cos = torch.einsum("sbcp,tbcp->st", unit, unit)  # sum over samples and pixels of cos(F_s, F_t)
    pairs = unit.shape[1] * unit.shape[3]
    variety = ((pairs - cos) * off).sum(1)
    return density, variety


def tdac_weights(features: torch.Tensor, r: float, lam: float) -> torch.Tensor:
    density, variety = tdac_scores(features, r)
    return _minmax(density) + lam * _minmax(variety)


def sample_counts(weights: torch.Tensor, total: int) -> list[int]:
    """n_s = round(N w_s / sum w), then the largest-remainder repair so that the counts sum to N exactly.
    Zero weights everywhere (every step alike) give the uniform split."""
    w = weights.double().clamp_min(0)
    if float(w.sum()) <= 0:
        w = torch.ones_like(w)
    exact = total * w / w.sum()
    counts = torch.round(exact).long()
    while int(counts.sum()) != total:
        diff = exact - counts
        if int(counts.sum()) < total:
            counts[int(torch.argmax(diff))] += 1
        else:
            diff = torch.where(counts > 0, diff, torch.full_like(diff, float("inf")))
            counts[int(torch.argmin(diff))] -= 1
    return counts.tolist()


def uniform_counts(steps: int, total: int) -> list[int]:
    return sample_counts(torch.ones(steps), total)
