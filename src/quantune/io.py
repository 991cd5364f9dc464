"""Atomic writes and safe reads for every file quantune touches.

Writes go to a temporary file (or folder) in the destination's folder and are renamed into place only when complete,
so an interrupted or failed write never leaves a half-written output. Pickles are read only through
`torch.load(weights_only=True)`, which refuses any pickle that would run code.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from quantune.errors import QuantuneError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on failure delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a finished file gets the usual permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


DIFFUSERS_FOLDER = ("model_index.json",)  # the marker of a pipeline folder quantune (or diffusers) wrote


def check_output(
    path: str | os.PathLike, overwrite: bool = False, markers: tuple[str, ...] = (), folder: bool = True
) -> Path:
    """Refuse an output that would replace something the user did not say may be replaced; returns the path.

    A missing output, or an empty folder, is always fine. An existing one needs `overwrite` (the CLI's
    --overwrite), and even then a folder is replaced only when it holds one of `markers` (a previous output of the
    same kind, e.g. "model_index.json"), so a mistyped --out never deletes unrelated files. A file where a folder
    is written (or the reverse), or a parent that is a file, is refused outright. Called before any model loads,
    so a bad --out fails in a second, and again by the writers themselves.
    """
    path = Path(path).absolute()
    if path.is_symlink():
        raise QuantuneError(f"{path} is a symbolic link: give the path it points to, or another --out")
    if path == Path.cwd() or path in Path.cwd().parents:
        raise QuantuneError(f"{path} is the current folder or holds it: choose a folder below it as --out")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise QuantuneError(
                    f"{parent} is a file, not a folder, so {path} cannot be written: choose another --out"
                )
            if not os.access(parent, os.W_OK | os.X_OK):
                raise QuantuneError(f"{parent} is not writable: choose another --out")
            break
    if not path.exists():
        return path
    if folder != path.is_dir():
        what, wanted = ("a file", "a folder") if folder else ("a folder", "a file")
        raise QuantuneError(f"{path} is {what}, where {wanted} is written: choose another --out")
    if folder and not any(path.iterdir()):
        return path
    if folder and not any(list(path.glob(m)) for m in markers):
        raise QuantuneError(f"{path} exists and holds other files: choose a new or empty --out folder")
    if not overwrite:
        raise QuantuneError(f"{path} already exists: pass --overwrite to replace it, or choose another --out")
    return path


def set_aside(path: Path) -> Path:
    """Rename the folder `path` to a new hidden name beside it (`.NAME.XXXX.old`, unique) and return that name."""
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    os.replace(path, aside)  # a folder may replace the empty one mkdtemp made
    return aside


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, markers: tuple[str, ...] = (), overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` (an old folder is removed last).

    An existing output is replaced only as `check_output(path, overwrite, markers)` allows.
    """
    path = check_output(path, overwrite, markers)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        old = set_aside(path) if path.exists() else None
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the hidden `.NAME.*.tmp` / `.NAME.*.old` entries an interrupted atomic write left in `folder`
    (never anything else); returns what was removed. Only for folders one process writes (a training run)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.name.startswith(".") and re.search(r"\.(tmp|old)$", p.name)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return stale


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write tensors (made contiguous, storage not shared) atomically as safetensors."""
    tensors = {
        k: v.detach().contiguous().clone() if _shares(v) else v.detach().contiguous() for k, v in tensors.items()
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})


def _shares(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file into (tensors, metadata); a missing, truncated or foreign file is a QuantuneError."""
    path = Path(path)
    if not path.is_file():
        raise QuantuneError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise QuantuneError(
            f"{path} is not a readable safetensors file ({reason}): it may be truncated or of another format; "
            "re-download or re-export it"
        ) from None
    return tensors, metadata


def load_pickle(path: str | os.PathLike) -> object:
    """Read a torch pickle (.pt/.ckpt/.bin) with weights_only=True: tensors and plain containers only."""
    path = Path(path)
    if not path.is_file():
        raise QuantuneError(f"no such file: {path}")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for unsafe or broken pickles
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # torch puts terminal colour codes in the message
        first = text.splitlines()[0] if text else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise QuantuneError(
                f"refused to load {path}: the pickle would run code ({first[:160]}); only plain tensor pickles "
                "are read. Convert it to safetensors with a tool you trust"
            ) from None
        raise QuantuneError(f"{path} is not a readable torch pickle ({first[:160]}): it may be truncated") from None


def write_json(obj: object, path: str | os.PathLike) -> None:
    """Write JSON (indent 2, sorted keys) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def make_grid(rows: list[list[Image.Image]]) -> Image.Image:
    """Rows of images pasted into one image, each cell the size of the first image, white behind short rows."""
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            grid.paste(img, (j * w, i * h))
    return grid


def save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
