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
Only the main process writes or deletes; every process runs the same checks, so all of them refuse alike.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from quantune.errors import QuantuneError
from quantune.io import check_output, remove_stale_temporaries
from quantune.train.checkpoint import find_checkpoint

logger = logging.getLogger(__name__)
RUN_MARKERS = ("config.json",)  # what every run writes first


@contextlib.contextmanager
def claimed_run_dir(out: str | os.PathLike, resume: str | None, overwrite: bool, main: bool) -> Iterator[None]:
    """Check `out` for this run and clean up after a failed start (see the module's docstring)."""
    out = Path(out)
    if resume:
        find_checkpoint(out / "checkpoints", resume)
        if main:
            _clean_temporaries(out)
        yield
        return
    existed = out.exists()
    if (out / RUN_MARKERS[0]).is_file() and not overwrite:
        raise QuantuneError(
            f"{out} holds a previous run: pass --resume latest to continue it, --overwrite to replace it, or set "
            "output_dir to a new folder"
        )
    check_output(out, True, RUN_MARKERS)  # a file, or a folder of other files, is refused even with --overwrite
    aside = None
    if main and existed and any(out.iterdir()):
        aside = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, aside)
        logger.info("--overwrite: the previous run in %s is replaced once this one has started", out)
    try:
        yield
    except BaseException:
        if main:
            _undo(out, existed and aside is None, aside)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _undo(out: Path, keep_folder: bool, aside: Path | None) -> None:
    """Remove what a failed start wrote; put a replaced run back."""
    if keep_folder:  # it was there, empty: empty it again
        for p in out.iterdir() if out.is_dir() else []:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    else:
        shutil.rmtree(out, ignore_errors=True)
    if aside is not None:
        os.replace(aside, out)
    logger.debug("the failed start's files in %s were removed", out)


def _clean_temporaries(out: Path) -> None:
    stale = remove_stale_temporaries(out) + remove_stale_temporaries(out / "checkpoints")
    if stale:
        logger.info(
            "removed %d unfinished write(s) an interrupted run left: %s", len(stale), ", ".join(p.name for p in stale)
        )
