"""Prompt lists: a text file of prompts (calibration, evaluation), and the default OpenMoji captions."""

from __future__ import annotations

from pathlib import Path

import torch

from quantune.data.openmoji import openmoji_glyphs
from quantune.errors import QuantuneError


def default_prompts(n: int = 512, seed: int = 0) -> list[str]:
    """Calibration prompts when none are given: captions of OpenMoji glyphs (shipped with quantune)."""
    captions = [g.caption for g in openmoji_glyphs()]
    pick = torch.randperm(len(captions), generator=torch.Generator().manual_seed(seed))[:n]
    return [captions[i] for i in pick.tolist()]


def read_prompts(path: str | Path) -> list[str]:
    """Calibration prompts from a text file, one per line (blank lines and lines starting with # skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        fix = "pass a UTF-8 text file, one prompt per line"
        raise QuantuneError(f"cannot read the prompts file {path} ({e}): {fix}") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise QuantuneError(f"{path} holds no prompts: write one prompt per line") from None
    return prompts
