"""A resumable table: each cell (one variant, one seed) is a JSON file written when the cell finishes, so a run that
is stopped part-way (or a later session) continues from the cells on disk instead of running them again."""

from __future__ import annotations

import json
import os
from pathlib import Path

from quantune.errors import QuantuneError


class CellCache:
    """The finished cells of one table under `folder`, keyed by a name of letters, digits, '-', '_' and '.';
    `settings` (the run's parameters) are stored with each cell and a cell made with others is not reused. A cell
    keeps the seconds it took (`put(..., seconds=)`); `earlier()` sums the cells this process reused, so a
    resumed table's cost counts the runs before it (bench/report.py)."""

    def __init__(self, folder: str | Path, settings: dict) -> None:
        self.folder = Path(folder)
        self.settings = settings
        self._reused: dict[str, float | None] = {}  # key -> its seconds (None: written before cells kept them)
        self._written: set[str] = set()  # cells this process computed (read back later: not reused)

    def path(self, key: str) -> Path:
        if not key or not all(c.isalnum() or c in "-_." for c in key):
            raise QuantuneError(f"cell key {key!r}: use letters, digits, '-', '_' and '.'")
        return self.folder / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self.path(key)
        if not path.is_file():
            return None
        cell = json.loads(path.read_text())
        if cell.get("settings") != self.settings:
            return None
        if key not in self._written:
            self._reused[key] = cell.get("seconds")
        return cell["row"]

    def put(self, key: str, row: dict, seconds: float | None = None) -> None:
        """Write atomically (a temporary file renamed over the target): a killed run leaves no half cell.
        `seconds`: what computing the cell took (its process's wall time)."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        cell = {
            "settings": self.settings,
            "row": row,
            **({"seconds": round(seconds, 1)} if seconds is not None else {}),
        }
        tmp.write_text(json.dumps(cell))
        os.replace(tmp, path)
        self._written.add(key)

    def earlier(self) -> dict:
        """The cells this process reused from earlier runs: how many, and the seconds of those that kept them."""
        timed = [s for s in self._reused.values() if s is not None]
        return {"cells": len(self._reused), "timed_cells": len(timed), "seconds": round(sum(timed), 1)}
