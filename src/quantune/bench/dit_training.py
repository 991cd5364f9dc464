"""Table 1b, training the diffusion transformers: step time and peak memory of one transformer training step at
real size, 512 px, batch 1, for quantune's LoRA methods and the peers a user would pick instead.

Models (bench/models.py, randomly initialised, no download: speed and memory are real, quality is not):
PixArt-Sigma XL/2 (0.6 B), SD3.5-medium (2.5 B), and FLUX.1 at its real width with 2 of its 19 double and 4 of its
38 single blocks (1.3 B; the 12 B model does not fit 24 GB in fp32). Their text inputs are random tensors of the
real widths and caption lengths (T5's 300 / 256 / 512 tokens), so the step is the transformer's alone.
Variants: quantune lora (fp32), qlora / intlora-mul / intlora-shift at W4A8 (every Linear quantized), exactly as
`quantune train` applies them; diffusers + peft, peft + bitsandbytes NF4 and peft + torchao int8 weight-only, all
rank-4 LoRA on the targets of diffusers' DreamBooth LoRA script for the family (bench/training.py has the details
of each peer). Each variant runs in its own process (bench/training.py's `run_variant`): one untimed step (the
optimizer state exists), then one timed step (quick: three); peak memory over the timed steps. Rows measured so
far are kept in OUT/.dit_training.rows.jsonl, so an interrupted run continues where it stopped (a failed row is
measured again). With QUANTUNE_BENCH_UNTIL (a Unix time) set, no row starts after it: the table is written with
the rows measured so far, the others marked as not measured, and the rows file stays for the next run.

    python -m quantune.bench.dit_training [--quick] --out DIR
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from quantune.bench.common import Plot, Table, run_child, table_main
from quantune.bench.report import partial_rows
from quantune.bench.training import PEERS, RANK, against_peft, run_variant, weights_label
from quantune.errors import QuantuneError

logger = logging.getLogger(__name__)
VARIANTS = [("lora", 32), ("qlora", 4), ("intlora-mul", 4), ("intlora-shift", 4)] + [(p, 32) for p in PEERS]
CHILD_TIMEOUT_S = 3600
NOT_MEASURED = "not measured yet (a rerun with --overwrite continues)"
UNTIL = "QUANTUNE_BENCH_UNTIL"  # Unix time after which no new row starts (a session's budget); unset: no limit


def settings(quick: bool) -> list[tuple[str, int, int]]:
    if quick:
        return [("zoo:tiny-pixart", 32, 1), ("zoo:tiny-sd3", 32, 1), ("zoo:tiny-flux", 32, 1)]
    return [("pixart-sigma", 512, 1), ("flux-2d4s", 512, 1), ("sd3.5-medium", 512, 1)]


def _measured(path: Path) -> dict[tuple, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return {(r["model"], r["res"], r["batch"], r["variant"], r["bits"]): r for r in rows}


def _row(variant: str, bits: int, model: str, res: int, batch: int, quick: bool) -> dict:
    reps, warmup = (3, 1) if quick else (1, 1)  # at real size on CPU a step takes from 25 s to minutes
    args = ["--one", variant, bits, model, res, batch, reps, warmup]
    try:
        row = run_child("quantune.bench.dit_training", args, timeout=CHILD_TIMEOUT_S)
    except QuantuneError as e:  # killed (out of memory) or failed: the row says so, the table goes on
        logger.warning("%s", e)
        row = {"model": model, "res": res, "batch": batch, "variant": variant, "weights": weights_label(variant, bits),
               "status": "failed (see the log)"}  # fmt: skip
    return {**row, "bits": bits}


def rows(quick: bool, out: Path) -> list[dict]:
    partial = partial_rows(out, "dit_training")
    done = _measured(partial)
    found = []
    for model, res, batch in settings(quick):
        group = []
        for variant, bits in VARIANTS:
            key = (model, res, batch, variant, bits)
            if key in done and not done[key]["status"].startswith("failed"):  # a failed row is measured again
                group.append(dict(done[key]))
            elif time.time() > float(os.environ.get(UNTIL, "inf")):
                label = weights_label(variant, bits)
                group.append({"model": model, "res": res, "batch": batch, "variant": variant, "weights": label,
                              "bits": bits, "status": NOT_MEASURED})  # fmt: skip
            else:
                done[key] = _row(variant, bits, model, res, batch, quick)
                with partial.open("a") as f:
                    f.write(json.dumps(done[key]) + "\n")
                group.append(dict(done[key]))
        against_peft(group)
        found += group
    return found


def table(quick: bool, out: Path) -> Table:
    Path(out).mkdir(parents=True, exist_ok=True)
    measured = rows(quick, out)
    return Table(
        "dit_training",
        f"Training step, diffusion transformers {'(quick: the tiny zoo models)' if quick else 'at real size'}, "
        f"rank-{RANK} LoRA on diffusers' DreamBooth targets",
        {"model": "{model}", "res x batch": "{res} x {batch}", "variant": "{variant}", "weights": "{weights}",
         "it/s": "{it_s:.3f}", "step (s)": "{step_s:.2f}", "peak MB": "{peak_mb:.0f}",
         "added by the steps (MB)": "{step_mb:.0f}", "time vs peft": "{time_vs_peft:.2f}",
         "memory vs peft": "{memory_vs_peft:.2f}", "trainable": "{trainable:,}", "status": "{status}"},
        measured,
        Plot("{model} {variant} {weights}", {"step (s)": "step_s", "peak MB over the steps": "peak_mb"}),
        notes=["one timed step after one untimed (quick: median of 3 after 1); random weights; text inputs random "
               "tensors of the real shapes (no text encoder runs)",
               "peak memory over the timed steps (optimizer state included, set-up excluded); on CPU the process's "
               "resident memory, libraries and the tiny pipeline around the transformer included (~0.6 GB)",
               "flux-2d4s: FLUX.1-dev's width (3072) and embedders with 2 double + 4 single blocks of 19 + 38",
               "bnb and torchao quantize Linear layers only; quantune's W4A8 methods quantize every Linear and "
               "Conv2d (the patch embedding) and calibrate 8-bit activations on the step's batch"],
    )  # fmt: skip


def _one(variant, bits, model, res, batch, reps, warmup) -> dict:
    return run_variant(variant, int(bits), model, int(res), int(batch), int(reps), int(warmup))


def main() -> None:
    table_main(__doc__, table, _one, 7)


if __name__ == "__main__":
    main()
