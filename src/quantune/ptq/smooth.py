"""SmoothQuant's migration (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models", arXiv 2211.10438, section 4): activation outliers concentrate in a few input channels
(in a DiT, after adaLN's per-sample scale and shift; ViDiT-Q, arXiv 2406.02540, and PTQ4DiT, arXiv 2405.16005,
measure the same); dividing them out and multiplying them into the weights makes both easy to quantize.

For a Linear y = x W^T, with max|X_j| the largest magnitude of input channel j over the calibration data and
max|W_j| that of weight column j,
    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)             (alpha: the migration strength, 0.5 in the paper)
    y = (x diag(s)^-1) (W diag(s))^T
W diag(s) is what the weight quantizer (AdaRound, ptq/adaround.py) rounds, and x diag(s)^-1 what the per-tensor
activation quantizer sees. The paper folds diag(s)^-1 into the preceding LayerNorm; a DiT's norms have no affine
weight and are modulated per sample, so quantune folds it into the activation quantizer instead: a per-channel step
s_j s_a with one zero point (quant/act.py), the same one division per element the per-tensor quantizer does, and
integers of W diag(s) (quant/intlayer.py). Written by hand: no library applies the migration to diffusers models
with static scales (NNCF's SmoothQuant targets OpenVINO graphs).
"""

from __future__ import annotations

import torch
from torch import nn

from quantune.ptq.config import PTQConfig
from quantune.targets import listed

S_RANGE = (1e-5, 1e5)  # s is clamped: a dead channel (max 0) keeps s = 1


def smoothable(model: nn.Module, cfg: PTQConfig, splits: dict[str, int]) -> list[str]:
    """The Linear layers SmoothQuant applies to: those with a quantized input (not act_fp, keep_fp or split)."""
    return [
        name for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not listed(cfg.keep_fp, name) and cfg.act_for(name) is not None
        and name not in splits
    ]  # fmt: skip


def input_maxima(model: nn.Module, names: list[str], batches) -> dict[str, torch.Tensor]:
    """max|X_j| per input channel of each named layer over `batches` (the model's forward keyword arguments)."""
    amax: dict[str, torch.Tensor] = {}

    def hook(module, args, name):
        x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
        amax[name] = torch.maximum(amax[name], x) if name in amax else x

    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n in names]
    try:
        with torch.no_grad():
            for kwargs in batches:
                model(**kwargs)
    finally:
        for h in hooks:
            h.remove()
    return amax


def smoothing_factors(model: nn.Module, names: list[str], batches, alpha: float) -> dict[str, torch.Tensor]:
    """{layer name: s} (module docstring) for the named Linear layers, from one pass over `batches`."""
    amax = input_maxima(model, names, batches)
    factors = {}
    for name, x in amax.items():
        w = model.get_submodule(name).weight.detach().abs().amax(0).float().to(x.device)
        s = x.pow(alpha) / w.pow(1 - alpha)
        s = torch.where((x > 0) & (w > 0) & torch.isfinite(s), s, torch.ones_like(s))
        factors[name] = s.clamp(*S_RANGE)
    return factors
