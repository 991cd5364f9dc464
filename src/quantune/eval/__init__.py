"""Evaluation: FID with quantune's offline OpenMoji feature network (or a local CLIP folder)."""

from quantune.eval.fid import fid

__all__ = ["fid"]
