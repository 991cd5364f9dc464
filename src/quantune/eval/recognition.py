"""Glyph recognition: does a sample for the caption of OpenMoji glyph k look like glyph k?

FID says how close two image distributions are; it does not say whether "rocket" gives a rocket. The OpenMoji
feature network (eval/features.py) is trained as a classifier over the 1,463 named glyphs, so it can answer that
offline: for image x_i generated from the caption of glyph y_i, with the network's logits z(x_i),

    rank_i = 1 + #{j : z_j(x_i) > z_{y_i}(x_i)},        top-k accuracy = mean_i 1[rank_i <= k].

On the OpenMoji glyphs themselves top-1 is the network's training accuracy (about 0.9 on clean glyphs, recorded in
its weights' metadata), which is the ceiling a model can reach here. Written by hand: the metric is tied to
quantune's own offline network, which no library ships. Captions must be OpenMoji names (`quantune eval`'s builtin
prompts are); anything else has no glyph to be recognised as.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from quantune.data import openmoji_dataset
from quantune.errors import QuantuneError
from quantune.eval.features import load_feature_net
from quantune.eval.fid import to_batch


@lru_cache(maxsize=1)
def caption_index() -> dict[str, int]:
    """OpenMoji caption -> the feature network's class index (the order it was trained in)."""

    return {c: i for i, c in enumerate(openmoji_dataset(size=32).captions)}


def check_captions(captions: list[str]) -> None:
    """One error line when a caption is not an OpenMoji name (before anything is generated)."""
    index = caption_index()
    unknown = sorted({c for c in captions if c not in index})
    if unknown:
        raise QuantuneError(f"not OpenMoji names: {unknown[:3]}: the glyph metric needs builtin prompts or OpenMoji "
                            "captions (e.g. 'cat face')")  # fmt: skip


def top_k(ranks: list[int], ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """{"glyph_top1": fraction of ranks <= 1, "glyph_top5": ...}."""
    return {f"glyph_top{k}": sum(r <= k for r in ranks) / len(ranks) for k in ks}


@torch.no_grad()
def glyph_logits(images, weights: str | Path | None = None, batch: int = 256) -> torch.Tensor:
    """The OpenMoji network's class logits [N, 1463] for PIL images or an [N, 3, H, W] tensor in [0, 1]."""

    net, x = load_feature_net(weights), to_batch(images)
    return torch.cat([net.head(net.features(x[i : i + batch])).float() for i in range(0, len(x), batch)])


def glyph_ranks(images, captions: list[str], weights: str | Path | None = None) -> list[int]:
    """For each image, the rank (1 = the network's first choice) of the glyph its caption names."""
    if len(images) != len(captions) or not captions:
        raise QuantuneError(f"glyph recognition needs one caption per image (got {len(images)} images, "
                            f"{len(captions)} captions)")  # fmt: skip
    check_captions(captions)
    logits = glyph_logits(images, weights)
    target = logits.gather(1, torch.tensor([caption_index()[c] for c in captions])[:, None])
    return (1 + (logits > target).sum(dim=1)).tolist()


def glyph_names(images, weights: str | Path | None = None) -> list[str]:
    """The caption of the glyph the network ranks first, per image (what it takes each image for)."""
    captions = list(caption_index())
    return [captions[i] for i in glyph_logits(images, weights).argmax(dim=1).tolist()]


def glyph_recognition(images, captions: list[str], weights: str | Path | None = None) -> dict[str, float]:
    """Top-1 and top-5 glyph accuracy of images generated from OpenMoji captions (see the module docstring)."""
    return top_k(glyph_ranks(images, captions, weights))
