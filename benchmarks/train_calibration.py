"""Benchmark: does the training-time activation calibration explain what an integer-base fine-tune loses of the
base model?

The fine-tuning table (`python -m quantune.bench.quality_finetune`, docs/intlora.md "Measured: quality") finds
recognition top-1 0.42-0.54 after IntLoRA or QLoRA at W8A8 / W4A8 against float LoRA's 0.61; its A8 input
quantizers are calibrated on the first batch only (`quant.calib_batches = 1`, one sample at one timestep, as the
IntLoRA reference does). This runs the table's IntLoRA-MUL recipe (configs/emoji_intlora_protocol.toml, subject 0,
seed 0, lr 2e-4) with each `quant.calib_batches` of --calib at each --bits, every run in its own process on one
thread (two at a time), scored as the table scores its rows (subject similarity of the merged, reloaded integer
model; recognition and FID of 100 OpenMoji captions). Writes CSV + Markdown.

    python benchmarks/train_calibration.py [--calib 1,16] [--bits W8A8,W4A8] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

COLUMNS = {"bits": "{bits}", "calib_batches": "{calib_batches}", "subject similarity": "{subject_similarity:.4f}",
           "top-1": "{glyph_top1:.3f}", "top-5": "{glyph_top5:.3f}", "FID vs OpenMoji": "{fid_vs_openmoji:.2f}",
           "train (s)": "{train_s:.0f}"}  # fmt: skip


def one(calib: int, bits: str, work: Path) -> dict:
    """One run in this process: train with `quant.calib_batches = calib`, then score the merged model."""
    import torch

    from quantune.bench.finetune_runs import run_one
    from quantune.bench.quality_finetune import protocol

    torch.set_num_threads(1)
    out = run_one(protocol(False), "intlora-mul", bits, "none", 2e-4, 0, 0, work, (f"quant.calib_batches={calib}",))
    ((label, row),) = out["models"].items()
    return {"calib_batches": calib, "bits": bits, "train_s": out["train_s"], "model": label,
            **{k: row[k] for k in ("subject_similarity", "glyph_top1", "glyph_top5", "fid_vs_openmoji")}}  # fmt: skip


def child(calib: int, bits: str, tmp: Path) -> dict:
    """One run in its own process (`python -m benchmarks.train_calibration --one ...`, from the checkout's root)."""
    from quantune.bench.common import run_child

    work = tmp / f"calib{calib}_{bits}"
    work.mkdir(parents=True)
    return run_child("benchmarks.train_calibration", ["--one", calib, bits, work])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calib", default="1,16", help="comma-separated quant.calib_batches values")
    p.add_argument("--bits", default="W8A8,W4A8")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    from quantune.bench.common import emit, setup

    setup()
    if a.one:
        emit(one(int(a.one[0]), a.one[1], Path(a.one[2])))
        return
    from quantune.bench.quality_finetune import class_images, protocol

    sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/report.py
    from report import write_report

    runs = [(int(c), b) for b in a.bits.split(",") for c in a.calib.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        class_images(protocol(False), Path(tmp) / "class_images")  # shared by the runs, as in the table
        with ThreadPoolExecutor(2) as pool:
            rows = list(pool.map(lambda r: child(*r, Path(tmp)), runs))
    title = "IntLoRA-MUL on zoo:emoji (protocol recipe, subject 0, seed 0, lr 2e-4) by quant.calib_batches"
    write_report(rows, a.out, "train_calibration", title, COLUMNS)


if __name__ == "__main__":
    main()
