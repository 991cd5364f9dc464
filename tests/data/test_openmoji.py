"""OpenMoji dataset: glyph selection, rendering in colour, the on-disk cache and its atomic writes."""

from __future__ import annotations

import json
import unicodedata

import numpy as np
import pytest
from PIL import Image, features

import quantune.data.openmoji as om
from quantune.data import OPENMOJI_ATTRIBUTION, ImageCaptionDataset, openmoji_dataset, openmoji_glyphs
from quantune.errors import QuantuneError


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


def _colourful(image: Image.Image) -> bool:
    a = _pixels(image)
    return float(np.abs(a[..., 0] - a[..., 2]).max()) > 60


def test_count_of_eligible_single_code_points_without_rendering(monkeypatch):
    monkeypatch.setattr(om, "_render", lambda *a, **k: pytest.fail("listing glyphs must not render"))
    glyphs = openmoji_glyphs()
    assert 1300 <= len(glyphs) <= 1600
    assert all(len(g.codepoints) == 1 and not 0xE000 <= g.codepoints[0] <= 0xF8FF for g in glyphs)
    assert [g.codepoints for g in glyphs] == sorted(g.codepoints for g in glyphs)
    captions = {g.caption for g in glyphs}
    assert {"grinning face", "red apple", "rocket", "cat face"} <= captions


def test_first_n_render_rgb_at_size_with_unicode_names(tmp_path):
    ds = openmoji_dataset(size=32, subset=8, cache_dir=tmp_path)
    assert isinstance(ds, ImageCaptionDataset) and len(ds) == 8
    assert ds.ids == [g.id for g in openmoji_glyphs()[:8]]
    assert ds.attribution == OPENMOJI_ATTRIBUTION and "CC BY-SA 4.0" in OPENMOJI_ATTRIBUTION
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {"image", "caption", "id"}
        assert item["image"].mode == "RGB" and item["image"].size == (32, 32)
        assert _pixels(item["image"]).std() > 10, f"{item['caption']} rendered blank"
        assert item["caption"] == unicodedata.name(chr(int(item["id"], 16))).lower()
    assert any(_colourful(ds[i]["image"]) for i in range(len(ds)))


def test_regex_subset_renders_recognisable_colour_faces(tmp_path):
    ds = openmoji_dataset(size=24, subset="cat face", cache_dir=tmp_path)
    assert 3 <= len(ds) <= 30
    assert "cat face" in ds.captions and all("cat face" in c for c in ds.captions)
    for item in ds:
        assert item["image"].size == (24, 24)
        assert _colourful(item["image"]), f"{item['caption']} is not in colour"
    assert len(openmoji_dataset(subset="^CAT FACE$", cache_dir=tmp_path)) == 1  # case-insensitive search


def test_list_subset_by_caption_or_code_point(tmp_path):
    ds = openmoji_dataset(subset=["rocket", "1f600", "U+1F34E"], cache_dir=tmp_path)
    assert sorted(ds.captions) == ["grinning face", "red apple", "rocket"]
    with pytest.raises(QuantuneError, match="no such emoji"):
        openmoji_dataset(subset=["rocket", "no such emoji"], cache_dir=tmp_path)


@pytest.mark.parametrize("subset", ["zzz-no-emoji-is-called-this", 0, -3])
def test_empty_subset_is_an_error_naming_it(tmp_path, subset):
    with pytest.raises(QuantuneError, match=f"subset={subset!r}"):
        openmoji_dataset(subset=subset, cache_dir=tmp_path)


def test_bad_regex_and_bad_size_are_errors(tmp_path):
    with pytest.raises(QuantuneError, match="regular expression"):
        openmoji_dataset(subset="face(", cache_dir=tmp_path)
    with pytest.raises(QuantuneError, match="size"):
        openmoji_dataset(size=0, cache_dir=tmp_path)


def test_second_call_reuses_the_cache(tmp_path, monkeypatch):
    first = openmoji_dataset(size=16, subset=5, cache_dir=tmp_path)
    folder = first.paths[0].parent
    index = json.loads((folder / "index.json").read_text())
    assert [e["id"] for e in index["glyphs"]] == first.ids
    assert all((folder / e["file"]).is_file() for e in index["glyphs"])
    mtimes = {p: p.stat().st_mtime_ns for p in folder.iterdir()}

    monkeypatch.setattr(om, "_render", lambda *a, **k: pytest.fail("cached glyphs were rendered again"))
    second = openmoji_dataset(size=16, subset=5, cache_dir=tmp_path)
    assert second.ids == first.ids and second.captions == first.captions
    assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
    assert list(_pixels(second[0]["image"]).ravel()) == list(_pixels(first[0]["image"]).ravel())


def test_a_killed_render_leaves_whole_files_and_resumes(tmp_path, monkeypatch):
    real, calls = om._render, []

    def dies_on_the_fourth(glyph, *args):
        calls.append(glyph.id)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(glyph, *args)

    monkeypatch.setattr(om, "_render", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        openmoji_dataset(size=16, subset=6, cache_dir=tmp_path)
    (folder,) = tmp_path.iterdir()
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{i}.png" for i in calls[:3])  # no temp, no index

    calls.clear()
    ds = openmoji_dataset(size=16, subset=6, cache_dir=tmp_path)
    assert len(calls) == 3 and len(ds) == 6 and (folder / "index.json").is_file()
    assert all(ds[i]["image"].size == (16, 16) for i in range(6))


def test_default_cache_dir_follows_quantune_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTUNE_CACHE", str(tmp_path))
    ds = openmoji_dataset(size=8, subset=1)
    assert ds.paths[0].parent.parent == tmp_path / "openmoji"


def test_sequence_captions_name_the_parts():
    by_id = {g.id: g.caption for g in openmoji_glyphs(include_sequences=True)}
    assert by_id["1F44D-1F3FD"] == "thumbs up sign medium skin tone"
    assert by_id["0023-FE0F-20E3"] == "keycap number sign"
    assert by_id["1F1FA-1F1F8"] == "flag us"
    assert all("\u200d" not in c and "variation selector" not in c and "zero width" not in c for c in by_id.values())
    assert len(by_id) > len(openmoji_glyphs())


@pytest.mark.skipif(not features.check("raqm"), reason="Pillow without libraqm cannot shape emoji sequences")
def test_a_sequence_renders_as_one_glyph(tmp_path):
    ds = openmoji_dataset(size=32, subset=["1F44D-1F3FD"], include_sequences=True, cache_dir=tmp_path)
    assert ds.captions == ["thumbs up sign medium skin tone"] and _colourful(ds[0]["image"])
