"""Evaluation: FID and subject similarity with quantune's offline OpenMoji feature network (or a local CLIP)."""

from quantune.eval.fid import fid
from quantune.eval.similarity import subject_similarity

__all__ = ["fid", "subject_similarity"]
