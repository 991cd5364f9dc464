"""Local model folders for the metrics that use outside networks (CLIP, DINO): found, and loaded completely."""

from __future__ import annotations

from pathlib import Path

from quantune.errors import QuantuneError


def local_folder(folder: str | Path | None, what: str, flag: str) -> Path:
    """The local model folder of a metric; nothing is ever downloaded."""
    if folder is None:
        raise QuantuneError(f"{what} needs a local model folder: pass {flag} DIR (nothing is downloaded)")
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise QuantuneError(f"no {what} model in {path} (no config.json): pass a local folder with {flag}")
    return path


def load_complete(cls, folder: Path, what: str):
    """`cls.from_pretrained` from a local folder, refusing one whose weights are missing or partial (transformers
    would initialise the rest at random, silently)."""
    try:
        model, info = cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError) as e:
        problem = f"cannot load the {what} model in {folder} ({type(e).__name__})"
        raise QuantuneError(f"{problem}: check its files") from None
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise QuantuneError(f"{folder} lacks {len(missing)} {what} weights (e.g. {missing[0]}): give a complete model")
    return model.eval()
