"""Evaluation: FID and subject similarity with quantune's offline OpenMoji feature network (or a local CLIP)."""

from quantune.eval.fid import fid
from quantune.eval.recognition import glyph_recognition
from quantune.eval.similarity import subject_similarity

__all__ = ["fid", "glyph_recognition", "subject_similarity"]
