import pytest
import torch

from quantune.errors import QuantuneError
from quantune.eval.recognition import glyph_names, glyph_ranks, glyph_recognition, top_k


@pytest.fixture(scope="module")
def glyphs():
    from quantune.data import openmoji_dataset

    data = openmoji_dataset(size=32)
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:64].tolist()
    return [data[i]["image"] for i in pick], [data.captions[i] for i in pick]


def test_the_glyphs_themselves_are_recognised(glyphs):
    """The real glyphs under their own names: near the network's clean training accuracy (0.91 recorded)."""
    images, captions = glyphs
    scores = glyph_recognition(images, captions)
    assert scores["glyph_top1"] >= 0.8 and scores["glyph_top5"] >= scores["glyph_top1"]


def test_wrong_names_are_not_recognised(glyphs):
    images, captions = glyphs
    shifted = captions[1:] + captions[:1]  # every image under another glyph's name
    assert glyph_recognition(images, shifted)["glyph_top1"] <= 0.05


def test_ranks_and_top_k():
    assert top_k([1, 2, 5, 6]) == {"glyph_top1": 0.25, "glyph_top5": 0.75}
    ranks = glyph_ranks(torch.rand(3, 3, 32, 32), ["cat face", "rocket", "red apple"])
    assert all(isinstance(r, int) and 1 <= r <= 1463 for r in ranks)


def test_bad_captions_are_refused():
    with pytest.raises(QuantuneError, match="not OpenMoji names: \\['a dog'\\]"):
        glyph_ranks(torch.rand(1, 3, 32, 32), ["a dog"])
    with pytest.raises(QuantuneError, match="one caption per image"):
        glyph_ranks(torch.rand(2, 3, 32, 32), ["cat face"])


def test_glyph_names_are_the_first_choice(glyphs):
    images, captions = glyphs
    """An image's first choice is its caption exactly when its caption's rank is 1."""
    names, ranks = glyph_names(images[:8]), glyph_ranks(images[:8], captions[:8])
    assert [n == c for n, c in zip(names, captions[:8])] == [r == 1 for r in ranks]
    assert sum(r == 1 for r in ranks) >= 6
