"""Subject similarity: identical sets score highest, other glyphs score lower, bad input is refused."""

from __future__ import annotations

import pytest

from quantune.errors import QuantuneError
from quantune.eval import subject_similarity


def test_same_subject_scores_higher_than_other_glyphs():
    from quantune.data import openmoji_dataset

    cats = [openmoji_dataset(size=32, subset=["cat face"])[0]["image"]] * 2
    others = [d["image"] for d in openmoji_dataset(size=32, subset=["red apple", "rocket", "snowman"])]
    same = subject_similarity(cats, cats)
    assert same == pytest.approx(1.0, abs=1e-5)
    assert subject_similarity(others, cats) < same - 0.05


def test_empty_input_is_refused():
    with pytest.raises(QuantuneError, match="at least one"):
        subject_similarity([], [])
