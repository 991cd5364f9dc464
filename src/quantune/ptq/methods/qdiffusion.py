"""qdiffusion: Q-Diffusion (Li et al. 2023, arXiv 2302.04304), after BRECQ (Li et al. 2021): uniform calibration
samples over the sampler steps, L2.4 ranges, then per unit `iters` iterations of AdaRound with the block-output
loss and the annealed rounding regulariser (activation quantizers off), then `iters` of the activation step sizes
with the rounding hard (ptq/reconstruct.py; docs/quantization.md)."""

from __future__ import annotations

from quantune.ptq.methods.base import Reconstructing, register_method
from quantune.ptq.reconstruct import ReconRecipe


@register_method
class QDiffusion(Reconstructing):
    """Uniform calibration; two-stage block reconstruction (weights, then activation step sizes)."""

    name = "qdiffusion"

    def recipe(self) -> ReconRecipe:
        return ReconRecipe(stages=((True, False), (False, True)))
