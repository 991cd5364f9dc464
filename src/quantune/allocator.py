"""Keep freed memory in the process on CPU: glibc's malloc returns every block over its mmap threshold (at most
32 MB) to the kernel when it is freed, so a training step that allocates the same large activations, gradients and
dequantized weights every step pays for them again in page faults (each 4 KiB page is zeroed on first touch).

`keep_freed_memory()` raises the mmap and trim thresholds (mallopt M_MMAP_THRESHOLD / M_TRIM_THRESHOLD, as
jemalloc or tcmalloc preloaded would behave), so freed blocks are reused by the next step. The peak does not grow:
the same bytes are live at the worst moment; only what is freed stays mapped until the process ends. Measured on
the SD-1.5 UNet at 256 px, batch 1, 2 threads (`QUANTUNE_KEEP_FREED=0|1 python -m quantune.bench.training --one
lora 32 sd15 256 1 2 1`): float LoRA step 4.77 -> 3.50 s, QLoRA W4A8 3.58 -> 3.51 s (its steps allocate little),
peak within 3 %. The `quantune` command calls it; set QUANTUNE_KEEP_FREED=0 to leave malloc as it is.
Nothing else in PyTorch does this (its CPU allocator has no caching), hence written here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger(__name__)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap and go back to it
FALLBACK = 32 << 20  # the largest mmap threshold older glibc accepts


def keep_freed_memory() -> bool:
    """Raise glibc's thresholds (module docstring); False where there is no glibc or QUANTUNE_KEEP_FREED=0."""
    if os.environ.get("QUANTUNE_KEEP_FREED", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to set
        return False
    for threshold in (THRESHOLD, FALLBACK):  # glibc before 2.35 refuses an mmap threshold over 32 MiB
        if mallopt(M_MMAP_THRESHOLD, threshold):
            break
    else:
        return False
    trimmed = bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))
    logger.debug("malloc keeps freed blocks up to %d MB (trim threshold set: %s)", threshold >> 20, trimmed)
    return True
