"""Image-caption datasets read from folders on disk, and the dataset type every quantune data source returns.

`ImageCaptionDataset` holds (id, caption, image path) records and opens each image only when it is indexed, so a
large folder costs a file list, not its pixels, in memory. Items are `{"image": PIL.Image (RGB), "caption": str,
"id": str}`; `to_tensor` turns an image into the [-1, 1] tensor the trainer feeds the VAE.

Two folder layouts are read:

- `image_folder`: the Hugging Face *imagefolder* convention: a `metadata.jsonl` (or `metadata.csv`) whose rows name
  a `file_name` and a caption column (`text` by default, `caption` accepted), or a `.txt` file with the same stem
  beside each image. Sub-folders are searched; a metadata file's `file_name` is relative to its own folder.
- `dreambooth_folder` / `class_folder`: every image directly in the folder captioned with one prompt.

Files that are not readable images are skipped with a logged warning naming each one; a folder left with no image
is a QuantuneError.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from quantune.errors import QuantuneError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
_CAPTION_COLUMNS = ("text", "caption")


class ImageCaptionDataset(Dataset):
    """Images on disk with one caption each; `ds[i]` opens image i and returns {"image", "caption", "id"}."""

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        captions: Sequence[str],
        ids: Sequence[str] | None = None,
        *,
        attribution: str | None = None,
    ) -> None:
        if len(paths) != len(captions) or (ids is not None and len(ids) != len(paths)):
            counts = f"{len(paths)} paths, {len(captions)} captions, {'no' if ids is None else len(ids)} ids"
            raise ValueError(f"ImageCaptionDataset needs one caption (and id) per path, got {counts}")
        self._paths = [Path(p) for p in paths]
        self._captions = [str(c) for c in captions]
        self._ids = [str(i) for i in ids] if ids is not None else [p.stem for p in self._paths]
        self.attribution = attribution  # licence credit to ship with anything trained on it (None: the user's own)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> dict:
        n = len(self._paths)
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"dataset indices must be integers, not {type(index).__name__}")
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        index = int(index) % n
        return {"image": load_rgb(self._paths[index]), "caption": self._captions[index], "id": self._ids[index]}

    @property
    def captions(self) -> list[str]:
        return list(self._captions)

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    @property
    def paths(self) -> list[Path]:
        return list(self._paths)

    def __repr__(self) -> str:
        where = self._paths[0].parent if self._paths else "-"
        return f"{type(self).__name__}({len(self)} images from {where})"


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image as RGB: EXIF rotation applied, transparency composited onto white."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise QuantuneError(
            f"cannot read image {path} ({e}): it changed since the dataset was indexed; reload the dataset"
        ) from None
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return im.convert("RGB")


def to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """Resize (shorter side to `size`) and centre-crop `image`; return float32 [3, size, size] in [-1, 1]."""
    if size < 1:
        raise QuantuneError(f"image size must be a positive number of pixels, got {size}")
    image = image.convert("RGB")
    if image.size != (size, size):
        image = ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # [size, size, 3] in [-1, 1]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # [3, size, size]


def _is_readable_image(path: Path) -> bool:
    """True when Pillow can identify and verify `path`; otherwise log a warning naming it."""
    try:
        with Image.open(path) as im:
            im.verify()
            width, height = im.size
        if width < 1 or height < 1:
            raise ValueError("zero-sized image")
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, struct.error...) for damaged files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        logger.warning("skipping %s: not a readable image (%s)", path, reason)
        return False
    return True


def _folder(path: str | os.PathLike, what: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise QuantuneError(f"no such folder: {folder}: pass the folder that holds your {what} images")
    return folder


def _files(folder: Path, recursive: bool) -> list[Path]:
    """Regular files under `folder` (hidden files and folders left out), sorted by relative path."""
    if not recursive:
        return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    out = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out += [Path(root) / n for n in names if not n.startswith(".")]
    return sorted(out, key=lambda p: p.relative_to(folder).as_posix())


def _read_metadata(meta: Path, caption_column: str) -> dict[Path, str]:
    """Map image path -> caption from a metadata.jsonl / metadata.csv (file_name relative to the metadata's folder)."""
    rows: list[tuple[int, dict]] = []
    lineno = 0
    try:
        with meta.open(encoding="utf-8", newline="") as f:
            if meta.suffix == ".csv":
                rows = [(i + 2, row) for i, row in enumerate(csv.DictReader(f))]
            else:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        row = json.loads(line)
                        if not isinstance(row, dict):
                            raise ValueError("a row is not a JSON object")
                        rows.append((lineno, row))
    except (ValueError, UnicodeDecodeError, csv.Error) as e:
        where = f" line {lineno}" if meta.suffix == ".jsonl" else ""
        raise QuantuneError(f"{meta}{where} is not valid {meta.suffix[1:]} ({e}): fix or delete that line") from None
    columns = [caption_column]
    if caption_column in _CAPTION_COLUMNS:  # `text` and `caption` stand in for each other
        columns += [c for c in _CAPTION_COLUMNS if c != caption_column]
    out: dict[Path, str] = {}
    for lineno, row in rows:
        if "file_name" not in row:
            raise QuantuneError(f"{meta} row {lineno} has no file_name: every row names its image in file_name")
        column = next((c for c in columns if c in row), None)
        if column is None:
            raise QuantuneError(
                f"{meta} row {lineno} has no {' or '.join(repr(c) for c in columns)} column (it has "
                f"{', '.join(sorted(row))}): add captions or pass caption_column=<column>"
            )
        out[(meta.parent / str(row["file_name"])).resolve()] = "" if row[column] is None else str(row[column])
    return out


def _no_images(folder: Path, skipped: int) -> QuantuneError:
    why = f" ({skipped} unreadable file(s) skipped, see the warnings)" if skipped else ""
    return QuantuneError(
        f"no usable image in {folder}{why}: add {', '.join(IMAGE_EXTENSIONS)} files to it or pass another folder"
    )


def image_folder(path: str | os.PathLike, caption_column: str = "text") -> ImageCaptionDataset:
    """Images captioned by a metadata.jsonl/.csv (`file_name` + `caption_column`) or a same-stem .txt beside each."""
    folder = _folder(path, "captioned")
    files = _files(folder, recursive=True)
    captions: dict[Path, str] = {}
    for meta in (p for p in files if p.name in _METADATA_NAMES):
        captions.update(_read_metadata(meta, caption_column))
    by_path = {p.resolve(): p for p in files}
    for target in captions:
        if target not in by_path:
            logger.warning("skipping metadata row for %s: no such file", target)

    images, skipped, stems = [], 0, set()
    for p in files:
        if p.name in _METADATA_NAMES:
            continue
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            if p.suffix.lower() != ".txt":
                logger.warning("skipping %s: not an image (%s files are read)", p, ", ".join(IMAGE_EXTENSIONS))
            continue
        stems.add(p.with_suffix("").resolve())
        if _is_readable_image(p):
            images.append(p)
        else:
            skipped += 1
    for p in files:
        if p.suffix.lower() == ".txt" and p.with_suffix("").resolve() not in stems:
            logger.warning("skipping %s: a caption file with no image of the same stem beside it", p)
    out_paths, out_captions = [], []
    for p in images:
        caption = captions.get(p.resolve())
        if caption is None:
            txt = next((t for t in (p.with_suffix(".txt"), p.with_suffix(".TXT")) if t.is_file()), None)
            if txt is None:
                raise QuantuneError(
                    f'{p} has no caption: add a row {{"file_name": "{p.name}", "{caption_column}": "..."}} to '
                    f"{p.parent / 'metadata.jsonl'}, or write the caption to {p.with_suffix('.txt')}"
                )
            caption = txt.read_text(encoding="utf-8", errors="replace").strip()
        out_paths.append(p)
        out_captions.append(caption)
    if not out_paths:
        raise _no_images(folder, skipped)
    ids = [p.relative_to(folder).as_posix() for p in out_paths]
    logger.info("image_folder %s: %d images", folder, len(out_paths))
    return ImageCaptionDataset(out_paths, out_captions, ids)


def dreambooth_folder(path: str | os.PathLike, instance_prompt: str) -> ImageCaptionDataset:
    """Every image directly in `path` captioned with `instance_prompt` (e.g. "a photo of sks dog")."""
    if not isinstance(instance_prompt, str) or not instance_prompt.strip():
        raise QuantuneError("the prompt is empty: pass the instance prompt, e.g. 'a photo of sks dog'")
    folder = _folder(path, "instance")
    images, skipped = [], 0
    for p in _files(folder, recursive=False):
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            logger.warning("skipping %s: not an image (%s files are read)", p, ", ".join(IMAGE_EXTENSIONS))
        elif _is_readable_image(p):
            images.append(p)
        else:
            skipped += 1
    if not images:
        raise _no_images(folder, skipped)
    logger.info("dreambooth_folder %s: %d images captioned %r", folder, len(images), instance_prompt)
    return ImageCaptionDataset(images, [instance_prompt] * len(images), [p.name for p in images])


def class_folder(path: str | os.PathLike, class_prompt: str) -> ImageCaptionDataset:
    """Prior-preservation images (e.g. "a photo of a dog"): the same rules as `dreambooth_folder`."""
    return dreambooth_folder(path, class_prompt)
