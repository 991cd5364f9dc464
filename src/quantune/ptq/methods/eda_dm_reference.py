"""eda-dm-reference: EDA-DM (arXiv 2401.04585) with the settings of its reference code (BienLuky/EDA-DM,
scripts/for_coco.sh and qdiff/quant_layer.py) where quantune's `eda-dm` deliberately departs from them, so the two
can be compared in one table (docs/quantization.md):
- no AdaRound rounding regulariser (round_reg = 0: only the FBR loss drives V);
- the reference's weight learning rates for Stable Diffusion: lr_w = 5e-4 at W8, 3e-2 at W4 and fewer bits
  (quantune's eda-dm: 0.5 at W4);
- the L2.4 range search over the reference's candidates (i / 100) max|x|, i = 1..100, down to 1 % of the range
  (quantune: 80 candidates, down to 21 %), for weights and activations.
- the shortcut split of the weight as well as of the input (qdiff/quant_layer.py's weight_quantizer and
  weight_quantizer_0): the up-block shortcut conv, whose input is concat(h, skip), gets a weight grid (scale and
  zero point per output channel) for the input channels of h and another for those of skip; the integer layer
  stores both (quant/intlayer.py: `weight_split`) and its kernel runs the two products it already ran for the
  split input, each with its part's scales (quant/kernels.py: SplitKernel).
TDAC, FBR (add_loss), QDrop and the joint one-stage reconstruction are eda-dm's. One difference remains, stated:
the activation step size is learned as log s with eda-dm's lr_a (the reference's absolute lr_a = 1e-4 on s itself
has no equivalent in that parameterization).
"""

from __future__ import annotations

import dataclasses

from quantune.ptq.methods.base import register_method
from quantune.ptq.methods.eda_dm import EdaDm

REFERENCE_LR_W = {8: 5e-4, 4: 3e-2}  # scripts/for_coco.sh, W8A8 and W4A8 (W5..W7: the W8 value)


def reference_lr_w(wbits: int) -> float:
    return REFERENCE_LR_W[8] if wbits > 4 else REFERENCE_LR_W[4]


@register_method
class EdaDmReference(EdaDm):
    """EDA-DM as its reference code sets it (module docstring)."""

    name = "eda-dm-reference"
    search = "l2.4-full"
    split_weight = True

    def __init__(self, cfg) -> None:
        # the reconstruction's settings: the reference's, whatever the run's flags say for them
        super().__init__(dataclasses.replace(cfg, round_reg=0.0, lr_w=reference_lr_w(cfg.wbits)))
