"""eda-dm: EDA-DM (arXiv 2401.04585) with its reference code's settings: TDAC picks the calibration samples per
sampler step (section 4.1, ptq/tdac.py), then FBR reconstructs each unit (section 4.2, ptq/reconstruct.py):
AdaRound and the activation step sizes learned jointly on the block output plus `add_loss` times the inner
layers' outputs, with QDrop (probability `qdrop`) mixing FP and quantized inputs and activations
(docs/quantization.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantune.errors import QuantuneError
from quantune.ptq.methods.base import Reconstructing, register_method
from quantune.ptq.reconstruct import ReconRecipe
from quantune.ptq.tdac import sample_counts, tdac_weights


@dataclass(frozen=True)
class EdaDmOptions:
    """EDA-DM's own hyperparameters: TDAC's density radius `tdac_r` (paper: 3.0 CIFAR / ImageNet, 0.3 LSUN / COCO)
    and variety weight `tdac_lambda` (1.2 CIFAR / ImageNet, 1.0 LSUN, 5.0 COCO); FBR's inner-layer weight
    `add_loss` (0.8 or 1.0) and the QDrop probability `qdrop` (0.5)."""

    tdac_r: float = 0.3
    tdac_lambda: float = 5.0
    add_loss: float = 0.8
    qdrop: float = 0.5

    def __post_init__(self) -> None:
        for name in ("add_loss", "tdac_lambda"):
            if getattr(self, name) < 0:
                raise QuantuneError(f"{name} = {getattr(self, name)} must be 0 or more")
        if self.tdac_r <= 0:
            raise QuantuneError(f"tdac_r = {self.tdac_r} must be positive")
        if not 0.0 <= self.qdrop < 1.0:
            raise QuantuneError(f"qdrop = {self.qdrop} must be in [0, 1)")


@register_method
class EdaDm(Reconstructing):
    """TDAC calibration; joint FBR reconstruction with QDrop."""

    name = "eda-dm"
    Options = EdaDmOptions

    def calibration_counts(self, features: torch.Tensor, total: int) -> tuple[torch.Tensor, list[int]]:
        weights = tdac_weights(features, self.options.tdac_r, self.options.tdac_lambda)
        return weights, sample_counts(weights, total)

    def recipe(self) -> ReconRecipe:
        return ReconRecipe(stages=((True, True),), qdrop=self.options.qdrop, add_loss=self.options.add_loss)
