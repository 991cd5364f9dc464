"""Shared by the benchmark tables: the machine, timing and peak memory, one variant per child process, and the
writers (CSV + Markdown + a matplotlib PNG per table).

Every measurement that a table compares runs in its own process (`run_child`): peak memory is then that variant's
own, and what ran before (allocator state, oneDNN caches, threads) cannot slow it down or speed it up. A child
prints one line `RESULT {json}` last; anything else it prints is log.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quantune.errors import QuantuneError

logger = logging.getLogger(__name__)
RESULT = "RESULT "


def setup() -> None:
    """A table process's logging: our lines plain, the libraries' progress bars and chatter off."""
    from quantune.logs import quiet_libraries

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_libraries()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """The commit of the checkout the bench runs in (the working directory; with '+changes' when its src/ differs
    from it: the code that ran, not the report files the run itself writes), or 'unknown'."""
    root = Path.cwd()
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=10", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "src"],
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
        return rev + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
    }


def machine_line(m: dict | None = None) -> str:
    m = m or machine()
    gpu = f", GPU {m['gpu']}" if m["gpu"] != "none" else ", no GPU"
    return f"{m['cpu']}, {m['threads']} threads{gpu}, torch {m['torch']}; {m['date']}, commit {m['commit']}"


def device() -> torch.device:
    from quantune.models.loading import resolve_device

    return resolve_device("auto")[0]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, reps: int, warmup: int) -> list[float]:
    """Wall times (s) of `reps` calls of fn after `warmup` untimed ones (CUDA synchronised around each)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def reset_peak() -> float:
    """Start a peak-memory window; returns the memory in use now (MB). CUDA: allocated tensors; CPU: the process's
    resident set after returning freed heap pages to the OS (so what set-up freed does not count)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        logger.warning("cannot reset the peak RSS here: peaks include set-up")
    return peak_mb()


def peak_mb() -> float:
    """Peak memory since `reset_peak` (MB): torch's peak allocation on CUDA, VmHWM (peak RSS) on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return rss_peak_mb()


def rss_peak_mb() -> float:
    """The process's peak resident memory (MB), on any machine."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(row: dict) -> None:
    """The child's answer: the last line of its stdout."""
    print(RESULT + json.dumps(row), flush=True)


def table_main(doc: str, tables: Callable, one: Callable | None = None, one_args: int = 0) -> None:
    """The command line of a table module: `--quick --out DIR` writes its table(s); `--one ARG...` (internal) runs
    one variant in this process and prints its row for `run_child`."""
    setup()
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="outputs/bench")
    if one is not None:
        p.add_argument("--one", nargs=one_args, help=argparse.SUPPRESS)
    a = p.parse_args()
    if getattr(a, "one", None):
        emit(one(*a.one))
        return
    from quantune.bench.report import finish_table

    finish_table(tables(a.quick, Path(a.out)), a.out, a.quick)


def override(settings, text: str, variable: str):
    """The dataclass `settings` with the `name=value` pairs of `text` (comma-separated, from the environment
    variable `variable`) replaced, each cast to the field's type: a smaller run than a table's full protocol."""
    from dataclasses import fields, replace

    types = {f.name: type(getattr(settings, f.name)) for f in fields(settings)}
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    unknown = [k for k, *_ in pairs if k.strip() not in types]
    if unknown or any(len(p) != 2 for p in pairs):
        raise ValueError(f"{variable}: expected name=value pairs of {sorted(types)}, got {text!r}")
    return replace(settings, **{k.strip(): types[k.strip()](v) for k, v in pairs})


def model_table_name(prefix: str, model: str) -> str:
    """`prefix` for zoo:emoji (the tables' first model), `prefix`_<model> for any other (zoo:emoji-dit:
    PREFIX_emoji_dit)."""
    if model == "zoo:emoji":
        return prefix
    return f"{prefix}_" + "".join(c if c.isalnum() else "_" for c in model.removeprefix("zoo:")).strip("_")


def run_child(module: str, args: list, timeout: float | None = None) -> dict:
    """Run `python -m module *args` in a fresh process and return its RESULT row; a failure raises with the
    child's last stderr lines."""
    cmd = [sys.executable, "-m", module, *map(str, args)]
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise QuantuneError(f"benchmark child timed out after {timeout:.0f} s ({' '.join(map(str, args))})") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode or not lines:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        if done.returncode < 0:  # SIGKILL with nothing on stderr: the kernel's out-of-memory killer, as a rule
            tail += f"\nkilled by signal {-done.returncode}" + (" (out of memory?)" if done.returncode == -9 else "")
        raise QuantuneError(f"benchmark child failed ({' '.join(map(str, args))}):\n{tail}")
    row = json.loads(lines[-1][len(RESULT) :])
    logger.info("%s (%.0f s)", {k: v for k, v in row.items() if not isinstance(v, (list, dict))},
                time.perf_counter() - start)  # fmt: skip
    return row


@dataclass
class Plot:
    """Bar panels: one per entry of `values` (axis label -> row key), one bar per row labelled by `label`."""

    label: str  # format string over a row
    values: dict[str, str]
    log: bool = False


@dataclass
class Table:
    name: str
    title: str
    columns: dict[str, str]  # header -> format string over a row
    rows: list[dict] = field(default_factory=list)
    plot: Plot | None = None
    notes: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)  # sample grids (paths relative to the table's folder)
    earlier: dict | None = None  # a resumed table's cells from earlier runs (bench/cells.py: CellCache.earlier)

    def __post_init__(self) -> None:
        if not self.name.replace("_", "").isalnum():
            raise QuantuneError(f"table name {self.name!r}: use letters, digits and '_'")

    def cell(self, fmt: str, row: dict) -> str:
        try:
            text = fmt.format(**row)
        except (KeyError, ValueError, TypeError):
            return "-"  # the variant did not produce this figure (e.g. a peer that is not installed)
        return "-" if text.strip().lower() == "nan" else text  # a figure the variant has none of (NaN)

    def markdown(self) -> str:
        head = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        body = ["| " + " | ".join(self.cell(f, r) for f in self.columns.values()) + " |" for r in self.rows]
        return "\n".join(head + body)


def write_table(table: Table, out: str | Path, info: dict | None = None) -> Path:
    """OUT/NAME.csv (every field of every row), OUT/NAME.md (title, machine, table, notes), OUT/NAME.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not table.rows:
        raise QuantuneError(f"table {table.name} has no rows")
    keys = list(dict.fromkeys(k for r in table.rows for k in r))
    with open(out / f"{table.name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, restval="")
        writer.writeheader()
        writer.writerows(table.rows)
    parts = [f"### {table.title}", "", f"Machine: {machine_line(info)}", "", table.markdown(), ""]
    parts += [f"- {n}" for n in table.notes]
    if table.plot is not None:
        from quantune.bench.plot import bar_chart

        bar_chart(table, out / f"{table.name}.png")
        parts += ["", f"![{table.name}]({table.name}.png)"]
    parts += [f"\n![sample grid]({img})" for img in table.images]
    (out / f"{table.name}.md").write_text("\n".join(parts).rstrip() + "\n")
    (out / f"{table.name}.json").write_text(json.dumps({"title": table.title, "machine": info or machine(),
                                                        "notes": table.notes, "images": table.images,
                                                        "rows": table.rows}, indent=1))  # fmt: skip
    return out / f"{table.name}.md"
