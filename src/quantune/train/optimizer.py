"""The optimizer of a training run: AdamW (torch), or bitsandbytes' 8-bit AdamW on CUDA (`optim.use_8bit_adam`)."""

from __future__ import annotations

import torch

from quantune.errors import QuantuneError


def make_optimizer(groups: list[dict], cfg) -> torch.optim.Optimizer:
    """AdamW over the parameter groups with the [optim] section's betas, eps and weight decay."""
    o = cfg.optim
    kwargs = dict(betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if o.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise QuantuneError(
                "optim.use_8bit_adam needs bitsandbytes: pip install bitsandbytes (CUDA only)"
            ) from None
        if not torch.cuda.is_available():
            raise QuantuneError("optim.use_8bit_adam needs CUDA: set it to false on CPU")
        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)
