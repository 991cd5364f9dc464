"""The GPU check (`make gpu-check`): what only a CUDA machine can show, in one script under 8 minutes, written to
benchmarks/results/gpu_check.{csv,md} for the README to quote. On a machine without CUDA it says so and exits 0.

Parts, in order (each stops at the time budget; a part that cannot run becomes a row saying why):
1. the CUDA tests (`pytest -k cuda`: the int_mm kernels, zoo models and the trainer on the GPU);
2. torch._int_mm kernels against the fake-quantized reference: zoo:emoji's UNet at W8A8 and W4A8, SQNR and time;
3. training steps of each method under mixed precision (bf16, fp16) through `quantune train` (configs/tiny_*.toml,
   4 steps, zoo:tiny), and LoRA with 8-bit Adam (needs bitsandbytes);
4. the SD-1.5 UNet architecture at 512 px, batch 1: training step time and peak memory per method and peft
   (quantune.bench.training's rows, each in its own process);
5. its inference at 512 px, batch 2: fp32, bf16 autocast, quantune W8A8 (int_mm), torchao int8 dynamic
   (quantune.bench.inference's rows).
The project's dependencies must be importable (diffusers, peft, ...; bitsandbytes and torchao for their rows): on a
machine without the project's venv, install the wheels first (docs/training.md, "GPU check").

    python benchmarks/gpu_check.py [--budget-s 470] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from report import write_report

ROOT = Path(__file__).resolve().parents[1]
METHODS = [("lora", "tiny_lora.toml", []), ("qlora", "tiny_qlora.toml", []),
           ("intlora-mul", "tiny_intlora.toml", []), ("intlora-shift", "tiny_intlora.toml", ["method=intlora-shift"]),
           ("full", "tiny_full.toml", [])]  # fmt: skip
TRAINING_ROWS = [("lora", 32), ("qlora", 8), ("qlora", 4), ("intlora-mul", 8), ("intlora-mul", 4),
                 ("intlora-shift", 4), ("diffusers+peft lora", 32)]  # fmt: skip
INFERENCE_ROWS = ["fp32", "bf16 autocast", "quantune W8A8", "torchao int8 dyn"]


class Budget:
    """The time left of the check's budget."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def _row(part: str, setting: str, status: str, **figures) -> dict:
    return {"part": part, "setting": setting, "status": status, "time_s": figures.get("time_s", float("nan")),
            "peak_mb": figures.get("peak_mb", float("nan")), "sqnr_db": figures.get("sqnr_db", float("nan")),
            "detail": figures.get("detail", "")}  # fmt: skip


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
                HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1")  # fmt: skip


def cuda_tests(budget: Budget) -> list[dict]:
    start = time.monotonic()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda", str(ROOT / "tests")]
    try:  # at most a third of the budget: the parts after it need the rest
        done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=max(budget.left() / 3, 1))
    except subprocess.TimeoutExpired:
        return [_row("CUDA tests", "pytest -k cuda", "timed out")]
    summary = (done.stdout.strip().splitlines() or ["no output"])[-1]
    status = "ok" if done.returncode == 0 else "failed"
    return [_row("CUDA tests", "pytest -k cuda", status, time_s=time.monotonic() - start, detail=summary)]


def int_mm_kernels() -> list[dict]:
    from quantune.bench.inference import denoiser_kwargs, prediction, quantune_int
    from quantune.bench.models import build
    from quantune.quant.kernels import drop_int_kernels, prepare_int_kernels
    from quantune.quant.primitives import sqnr_db

    rows = []
    for wbits in (8, 4):
        bm = build("zoo:emoji")
        unet = bm.denoiser.cuda().eval()
        calib = [{k: v.cuda() if torch.is_tensor(v) else v for k, v in denoiser_kwargs(bm, 2, 32, s).items()}
                 for s in (1, 2)]  # fmt: skip
        kwargs = calib[0]
        q = quantune_int(unet, calib, wbits, 8)
        with torch.no_grad():
            drop_int_kernels(q)
            reference = prediction(q(**kwargs)).float()  # fake-quantized: same integers, float arithmetic
            ways = prepare_int_kernels(q, "int_mm")
            out = prediction(q(**kwargs)).float()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(10):
                q(**kwargs)
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 100
        detail = ", ".join(f"{n} {k}" for k, n in sorted(ways.items()))
        rows.append(_row("int_mm vs fake quant", f"zoo:emoji UNet W{wbits}A8, 32 px, batch 2", "ok",
                         time_s=ms / 1000, sqnr_db=sqnr_db(reference, out), detail=detail))  # fmt: skip
    return rows


def training_runs(budget: Budget) -> list[dict]:
    rows = []
    runs = [(m, c, s, p) for p in ("bf16", "fp16") for m, c, s in METHODS]
    runs.append(("lora + 8-bit Adam", "tiny_lora.toml", ["optim.use_8bit_adam=true"], "bf16"))
    for method, config, sets, precision in runs:
        if budget.left() < 30:
            rows.append(_row("mixed-precision training", f"{method} {precision}", "skipped (time budget)"))
            continue
        with tempfile.TemporaryDirectory() as out:
            sets = [f"output_dir={out}", "train.steps=4", "log.tensorboard=false", "log.validation_every=0",
                    f"train.mixed_precision={precision}", *sets]  # fmt: skip
            cmd = [sys.executable, "-m", "quantune", "train", str(ROOT / "configs" / config)]
            start = time.monotonic()
            try:
                done = subprocess.run(cmd + [f"--set={s}" for s in sets], capture_output=True, text=True, env=_env(),
                                      timeout=budget.left())  # fmt: skip
            except subprocess.TimeoutExpired:
                rows.append(_row("mixed-precision training", f"{method} {precision}", "timed out"))
                continue
            took = time.monotonic() - start
            error = (done.stderr.strip().splitlines() or [""])[-1][:160]
            status = "ok" if done.returncode == 0 and (Path(out) / "result.json").exists() else "failed"
            rows.append(_row("mixed-precision training", f"{method} {precision}, zoo:tiny, 4 steps", status,
                             time_s=took, detail="" if status == "ok" else error))  # fmt: skip
    return rows


def sd15_rows(budget: Budget) -> list[dict]:
    from quantune.bench.common import run_child

    rows = []
    for variant, bits in TRAINING_ROWS:
        setting = f"training {variant} {'fp32' if bits == 32 else f'W{bits}A8'}, sd15 512 px x 1"
        if budget.left() < 40:
            rows.append(_row("SD-1.5 512 px", setting, "skipped (time budget)"))
            continue
        try:
            r = run_child("quantune.bench.training", ["--one", variant, bits, "sd15", 512, 1, 3, 1], budget.left())
        except Exception as e:  # noqa: BLE001 - a failed row is reported, the check goes on
            rows.append(_row("SD-1.5 512 px", setting, "failed", detail=str(e).splitlines()[-1][:160]))
            continue
        rows.append(_row("SD-1.5 512 px", setting, r["status"], time_s=r.get("step_s", float("nan")),
                         peak_mb=r.get("peak_mb", float("nan"))))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name in INFERENCE_ROWS:
            if budget.left() < 40:
                rows.append(_row("SD-1.5 512 px", f"inference {name}", "skipped (time budget)"))
                continue
            args = ["--one", name, "sd15", "denoiser", 512, 2, 10, str(Path(tmp) / "fp32.pt")]
            try:
                r = run_child("quantune.bench.inference", args, budget.left())
            except Exception as e:  # noqa: BLE001 - a failed row is reported, the check goes on
                rows.append(_row("SD-1.5 512 px", f"inference {name}", "failed", detail=str(e).splitlines()[-1][:160]))
                continue
            rows.append(
                _row(
                    "SD-1.5 512 px",
                    f"inference {name}, batch 2",
                    r["status"],
                    time_s=r.get("median_ms", float("nan")) / 1000,
                    sqnr_db=r.get("sqnr_db", float("nan")),
                )
            )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, default=470.0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    if torch.version.cuda is None:
        print(f"gpu-check: no CUDA device on this machine or this torch ({torch.__version__}) is a CPU build: "
              "nothing to check (on a GPU machine, run it with a CUDA build of torch)")  # fmt: skip
        return 0
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine (torch.cuda.is_available() is False): nothing to check")
        return 0
    sys.path.insert(0, str(ROOT / "src"))
    os.environ.update(_env())  # the benchmark children (run_child) import quantune from src/ too
    budget = Budget(a.budget_s)
    rows = cuda_tests(budget)
    for part in (int_mm_kernels, training_runs, sd15_rows):
        try:
            rows += part(budget) if part is not int_mm_kernels else part()
        except Exception as e:  # noqa: BLE001 - a part that cannot run (a missing package) is a row
            rows.append(_row(part.__name__, "-", "failed", detail=f"{type(e).__name__}: {e}"[:160]))
    title = f"GPU check: {torch.cuda.get_device_name()}, torch {torch.__version__}"
    columns = {"part": "{part}", "setting": "{setting}", "status": "{status}", "time (s)": "{time_s:.3f}",
               "peak MB": "{peak_mb:.0f}", "SQNR (dB)": "{sqnr_db:.1f}", "detail": "{detail}"}  # fmt: skip
    write_report(rows, a.out, "gpu_check", title, columns)
    return 0 if all(r["status"] in ("ok",) or r["status"].startswith("skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
