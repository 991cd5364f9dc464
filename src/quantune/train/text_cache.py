"""`data.cache_text_embeddings`: every caption's conditioning computed once, before the first step, as kohya
sd-scripts (`--cache_text_encoder_outputs`) and SimpleTuner do, so no text encoder (T5 above all) runs during the
steps. Only for frozen text encoders (no text-encoder LoRA, no full text-encoder training): the config refuses
the combination.

A caption's conditioning is the family's (`Family.condition`, batch 1, at the run's image size), kept on the CPU;
a batch is the captions' entries stacked along the batch dimension. Entries without one (FLUX's `txt_ids`,
[L, 3], the same for every caption) are taken as they are. The text encoders stay loaded for the validation grids.
"""

from __future__ import annotations

import logging

import torch

from quantune.families import family_of

logger = logging.getLogger(__name__)


class TextCache:
    """Captions -> the denoiser's conditioning, computed once for a fixed set of captions."""

    def __init__(self, pipe, captions: list[str], size: tuple[int, int]) -> None:
        family = family_of(pipe)
        self._entries: dict[str, dict] = {}
        with torch.no_grad():
            for caption in dict.fromkeys(captions):  # unique, in order
                self._entries[caption] = _to(family.condition(pipe, [caption], size), "cpu")
        logger.info("cached the text conditioning of %d captions", len(self._entries))

    @classmethod
    def for_run(cls, pipe, cfg, train_set, class_set=None) -> TextCache:
        """Every caption a step of the run can draw: the data's, the class images', "" (caption dropout)."""
        captions = list(train_set.captions) + (list(class_set.captions) if class_set is not None else [])
        captions += [""] if cfg.data.caption_dropout else []
        return cls(pipe, captions, (cfg.data.resolution, cfg.data.resolution))

    def __len__(self) -> int:
        return len(self._entries)

    def condition(self, captions: list[str], device) -> dict:
        """The conditioning of a batch of captions (each cached), on `device`."""
        missing = [c for c in captions if c not in self._entries]
        if missing:
            raise KeyError(f"caption not cached: {missing[0]!r}")
        return _to(_stack([self._entries[c] for c in captions]), device)


def _stack(entries: list[dict]) -> dict:
    out = {}
    for key, first in entries[0].items():
        if isinstance(first, dict):
            out[key] = _stack([e[key] for e in entries])
        elif isinstance(first, torch.Tensor) and first.dim() > 0 and first.shape[0] == 1:
            out[key] = torch.cat([e[key] for e in entries])
        else:
            out[key] = first  # shared by every caption (FLUX's txt_ids)
    return out


def _to(cond: dict, device) -> dict:
    return {k: _to(v, device) if isinstance(v, dict) else v.to(device) if torch.is_tensor(v) else v
            for k, v in cond.items()}  # fmt: skip
