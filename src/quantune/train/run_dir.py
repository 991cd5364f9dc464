"""A training run's folder (`output_dir`): claimed before anything is written, left as it was if the start fails.

- A fresh run needs a new or empty folder. A folder holding a previous run (its config.json) is refused unless the
  user says what to do with it: `--resume` continues it, `--overwrite` replaces it. The replaced run is moved aside
  and deleted only once the new run has started (it is put back if the start fails); a folder holding anything else
  is never touched.
- `--resume` needs the run's checkpoint, which is looked up before any model loads.
- A start that fails (an unknown model, a missing data folder, ...) removes what it wrote, so a failed `train`
  leaves no config.json, TensorBoard file or class image behind; a run that started keeps its logs and checkpoints.
- The hidden temporaries an interrupted atomic write left (`checkpoints/.step-000100.*.tmp`) are removed at start,
  and logged; resuming never reads them.
Only the main process checks, writes or deletes (the others would race its moves); when it refuses, the launcher
stops the others.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from quantune.errors import QuantuneError
from quantune.io import check_output, remove_stale_temporaries, set_aside
from quantune.train.checkpoint import find_checkpoint

logger = logging.getLogger(__name__)


def is_run(folder: Path) -> bool:
    """True when `folder` holds a quantune training run (its config.json has a method and a train section), not,
    say, a Hugging Face model folder with a config.json of its own."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "method" in config and "train" in config


@contextlib.contextmanager
def claimed_run_dir(out: str | os.PathLike, resume: str | None, overwrite: bool, main: bool) -> Iterator[None]:
    """Check `out` for this run and clean up after a failed start (see the module's docstring). Only the main
    process checks and moves; should it refuse, the launcher stops the others."""
    out = Path(out).absolute()
    if resume and overwrite:
        raise QuantuneError("--resume continues the run in output_dir and --overwrite replaces it: pass one of them")
    if resume:
        find_checkpoint(out / "checkpoints", resume)
        if main:
            _clean_temporaries(out)
        yield
        return
    if not main:
        yield
        return
    existed = out.is_dir()
    if existed and is_run(out) and not overwrite:
        raise QuantuneError(
            f"{out} holds a previous run: pass --resume latest to continue it, --overwrite to replace it, or set "
            "output_dir to a new folder"
        )
    if existed and any(out.iterdir()) and not is_run(out):
        raise QuantuneError(f"{out} exists and holds other files: set output_dir to a new or empty folder")
    check_output(out, True, ("config.json",))  # a file, a link, a parent that is a file, an unwritable place
    aside = set_aside(out) if existed and any(out.iterdir()) else None
    if aside is not None:
        logger.info("--overwrite: the previous run in %s is replaced once this one has started", out)
    try:
        yield
    except BaseException:
        _undo(out, existed and aside is None, aside)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _undo(out: Path, keep_folder: bool, aside: Path | None) -> None:
    """Remove what a failed start wrote; put a replaced run back. Never raises (the start's error is the one to
    report): what it cannot undo, it logs."""
    try:
        if keep_folder:  # it was there, empty: empty it again
            for p in list(out.iterdir()) if out.is_dir() else []:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        elif out.exists():
            shutil.rmtree(out)
        if aside is not None:
            os.replace(aside, out)
        logger.debug("the failed start's files in %s were removed", out)
    except OSError as e:
        where = f"; the previous run is kept in {aside}" if aside is not None and aside.exists() else ""
        logger.warning("could not undo the failed start in %s (%s)%s", out, e, where)


def _clean_temporaries(out: Path) -> None:
    stale = remove_stale_temporaries(out) + remove_stale_temporaries(out / "checkpoints")
    if stale:
        logger.info(
            "removed %d unfinished write(s) an interrupted run left: %s", len(stale), ", ".join(p.name for p in stale)
        )
