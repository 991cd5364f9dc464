"""Folder datasets (imagefolder metadata / .txt captions, DreamBooth prompts), skipping rules and to_tensor."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from quantune.data import ImageCaptionDataset, class_folder, dreambooth_folder, image_folder, to_tensor
from quantune.errors import QuantuneError


def _image(path, colour=(200, 30, 30), size=(12, 10), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_metadata_jsonl_captions(tmp_path):
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.jpg", (10, 200, 10))
    _image(tmp_path / "sub" / "c.webp")
    _jsonl(
        tmp_path / "metadata.jsonl",
        [{"file_name": "a.png", "text": "a red square"}, {"file_name": "b.jpg", "text": "green"}],
    )
    _jsonl(tmp_path / "sub" / "metadata.jsonl", [{"file_name": "c.webp", "text": "nested"}])
    ds = image_folder(tmp_path)
    assert isinstance(ds, ImageCaptionDataset) and len(ds) == 3
    assert ds.ids == ["a.png", "b.jpg", "sub/c.webp"]
    assert ds.captions == ["a red square", "green", "nested"]
    item = ds[1]
    assert item["caption"] == "green" and item["id"] == "b.jpg"
    assert item["image"].mode == "RGB" and item["image"].size == (12, 10)
    assert ds[-1]["caption"] == "nested"
    with pytest.raises(IndexError):
        ds[3]
    assert [it["id"] for it in ds] == ds.ids


def test_caption_column_alternatives(tmp_path):
    _image(tmp_path / "a.png")
    _jsonl(tmp_path / "metadata.jsonl", [{"file_name": "a.png", "caption": "from caption", "prompt": "from prompt"}])
    assert image_folder(tmp_path).captions == ["from caption"]  # `caption` stands in for the default `text`
    assert image_folder(tmp_path, caption_column="prompt").captions == ["from prompt"]
    with pytest.raises(QuantuneError, match="caption_column"):
        image_folder(tmp_path, caption_column="label")


def test_metadata_csv(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text('file_name,text\na.png,"a square, red"\n')
    assert image_folder(tmp_path).captions == ["a square, red"]


def test_bad_metadata_line_is_an_error_naming_it(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{not json\n')
    with pytest.raises(QuantuneError, match="metadata.jsonl line 2"):
        image_folder(tmp_path)


def test_txt_sidecar_captions(tmp_path):
    _image(tmp_path / "one.png")
    _image(tmp_path / "two.jpeg")
    (tmp_path / "one.txt").write_text("first caption\n")
    (tmp_path / "two.txt").write_text("  second caption ")
    ds = image_folder(tmp_path)
    assert dict(zip(ds.ids, ds.captions, strict=True)) == {"one.png": "first caption", "two.jpeg": "second caption"}


def test_corrupt_and_non_image_files_are_skipped_with_a_warning(tmp_path, caplog):
    _image(tmp_path / "good.png")
    (tmp_path / "good.txt").write_text("good")
    bad = tmp_path / "broken.png"
    bad.write_bytes(os.urandom(256))
    (tmp_path / "broken.txt").write_text("never used")
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image, and no image called notes.*")
    other = tmp_path / "readme.md"
    other.write_text("# hello")
    with caplog.at_level(logging.WARNING, logger="quantune.data"):
        ds = image_folder(tmp_path)
    assert ds.ids == ["good.png"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for path in (bad, notes, other):
        assert sum(str(path) in m for m in warned) == 1, (path, warned)
    assert not any("good" in m for m in warned)


def test_image_without_caption_names_the_file_and_both_fixes(tmp_path):
    _image(tmp_path / "a.png")
    _image(tmp_path / "lonely.png")
    (tmp_path / "a.txt").write_text("captioned")
    with pytest.raises(QuantuneError) as e:
        image_folder(tmp_path)
    message = str(e.value)
    assert "lonely.png" in message and "metadata.jsonl" in message and "lonely.txt" in message


def test_empty_folder_is_an_error(tmp_path, caplog):
    with pytest.raises(QuantuneError, match=str(tmp_path)):
        image_folder(tmp_path)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    with caplog.at_level(logging.WARNING), pytest.raises(QuantuneError, match="no usable image"):
        image_folder(tmp_path)
    assert "broken.jpg" in caplog.text


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(QuantuneError, match="no such folder"):
        image_folder(tmp_path / "nope")
    with pytest.raises(QuantuneError, match="no such folder"):
        dreambooth_folder(tmp_path / "nope", "a photo of sks dog")


def test_dreambooth_captions_are_the_prompt(tmp_path, caplog):
    for i in range(3):
        _image(tmp_path / f"dog{i}.jpg", (i * 60, 80, 120))
    (tmp_path / "bad.png").write_bytes(os.urandom(64))
    with caplog.at_level(logging.WARNING):
        ds = dreambooth_folder(tmp_path, "a photo of sks dog")
    assert ds.ids == ["dog0.jpg", "dog1.jpg", "dog2.jpg"]
    assert ds.captions == ["a photo of sks dog"] * 3
    assert ds[2]["caption"] == "a photo of sks dog" and ds[2]["image"].mode == "RGB"
    assert "bad.png" in caplog.text
    assert class_folder(tmp_path, "a photo of a dog").captions == ["a photo of a dog"] * 3
    with pytest.raises(QuantuneError, match="prompt"):
        dreambooth_folder(tmp_path, "  ")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(QuantuneError, match="no usable image"):
        dreambooth_folder(empty, "a photo of sks dog")


def test_transparent_png_is_composited_onto_white(tmp_path):
    _image(tmp_path / "clear.png", (0, 0, 0, 0), mode="RGBA")
    image = dreambooth_folder(tmp_path, "x")[0]["image"]
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)


def test_to_tensor_shape_and_range():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 20))  # left quarter blue: cropped away by the centre crop
    t = to_tensor(image, 16)
    assert t.shape == (3, 16, 16) and t.dtype == torch.float32
    assert float(t.min()) >= -1.0 and float(t.max()) <= 1.0
    assert torch.allclose(t[:, 8, 8], torch.tensor([1.0, -1.0, -1.0]))
    grey = to_tensor(Image.new("L", (8, 8), 128), 8)
    assert grey.shape == (3, 8, 8) and np.allclose(grey.numpy(), 128 / 127.5 - 1, atol=1e-6)
