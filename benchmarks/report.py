"""Shared by the benchmark scripts: write rows as CSV + a Markdown table (with the machine named) and print it."""

from __future__ import annotations

import csv
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU threads, torch {torch.__version__}"


def median_ms(fn, reps: int) -> float:
    """Median wall time of `reps` calls of `fn` after one warm-up, in ms."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def write_report(rows: list[dict], out_dir: str | Path, name: str, title: str, columns: dict[str, str]) -> None:
    """rows -> OUT/name.csv (every field) and OUT/name.md (`columns`: header -> format string over a row)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"{title}; {machine()}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt.format(**r) for fmt in columns.values()) + " |" for r in rows]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
