"""A resumable table: each cell (one variant, one seed) is a JSON file written when the cell finishes, so a run that
is stopped part-way (or a later session) continues from the cells on disk instead of running them again."""

from __future__ import annotations

import json
import os
from pathlib import Path

from quantune.errors import QuantuneError


class CellCache:
    """The finished cells of one table under `folder`, keyed by a name of letters, digits, '-', '_' and '.';
    `settings` (the run's parameters) are stored with each cell and a cell made with others is not reused."""

    def __init__(self, folder: str | Path, settings: dict) -> None:
        self.folder = Path(folder)
        self.settings = settings

    def path(self, key: str) -> Path:
        if not key or not all(c.isalnum() or c in "-_." for c in key):
            raise QuantuneError(f"cell key {key!r}: use letters, digits, '-', '_' and '.'")
        return self.folder / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self.path(key)
        if not path.is_file():
            return None
        cell = json.loads(path.read_text())
        return cell["row"] if cell.get("settings") == self.settings else None

    def put(self, key: str, row: dict) -> None:
        """Write atomically (a temporary file renamed over the target): a killed run leaves no half cell."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"settings": self.settings, "row": row}))
        os.replace(tmp, path)
