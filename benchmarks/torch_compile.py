"""Benchmark: graph compilation (`torch.compile`, inductor with freezing) as a route for quantune's integer UNet on
the CPU, against the eager kernels and the OpenVINO backend quantune deploys by default.

Inductor's x86 path is the one that fuses activation quantization and the zero-point / scale epilogues into the
neighbouring ops when it sees a quantized graph; quantune's integer layers call oneDNN's int8 ops (quant/kernels.py),
so this measures what inductor makes of them as they are. Variants, each in its own process (median of --reps
calls after a warm-up; "prepare" = quantization + compilation or conversion, with its first call):
fp32 eager, fp32 compiled, quantune W8A8 eager (PyTorch's kernels), quantune W8A8 compiled, quantune W8A8 on
OpenVINO (models/deploy.py's default). SQNR against fp32 eager's output in the same process. The model: zoo:emoji's
UNet (32 px) or the SD-1.5 UNet architecture (random weights), batch 2; minmax W8A8 on two random batches, as the
`inference` table. Writes benchmarks/results/torch_compile_<model>_<res>.{csv,md}.

    python benchmarks/torch_compile.py [--model zoo:emoji|sd15] [--res 32] [--reps 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from report import median_ms, write_report

VARIANTS = ["fp32 eager", "fp32 torch.compile", "quantune W8A8 eager", "quantune W8A8 torch.compile",
            "quantune W8A8 on OpenVINO"]  # fmt: skip
RESULT = "RESULT "


def prepare(variant: str, model, calib):
    """The callable a variant times (its kwargs-taking forward)."""
    from quantune.bench.inference import quantune_int

    if variant.startswith("quantune"):
        model = quantune_int(model, calib, 8, 8)
    if variant.endswith("OpenVINO"):
        from quantune.quant.ov_runtime import OpenVINOModule

        return OpenVINOModule(model)
    if variant.endswith("torch.compile"):
        import torch._inductor.config as inductor

        inductor.freezing = True  # weights as constants: what lets inductor fold the int8 weights' epilogues
        return torch.compile(model, dynamic=False)  # static shapes (dynamic ones fail in codegen on the int8 ops)
    return model


def child(variant: str, model_name: str, res: int, reps: int) -> dict:
    from quantune.bench.inference import denoiser_kwargs, prediction
    from quantune.bench.models import build
    from quantune.quant.primitives import sqnr_db

    torch.manual_seed(0)
    bm = build(model_name)
    fp = bm.denoiser.eval().requires_grad_(False)
    calib = [denoiser_kwargs(bm, 2, res, seed=s) for s in (1, 2)]
    kwargs = denoiser_kwargs(bm, 2, res)
    with torch.no_grad():
        reference = prediction(fp(**kwargs)).clone()
        start = time.perf_counter()
        run = prepare(variant, fp, calib)
        out = prediction(run(**kwargs))
        prepared = time.perf_counter() - start
        ms = median_ms(lambda: run(**kwargs), reps)
    return {"variant": variant, "model": model_name, "res": res, "median_ms": ms, "prepare_s": prepared,
            "sqnr_db": sqnr_db(reference, out), "threads": torch.get_num_threads()}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="zoo:emoji")
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--variant", help=argparse.SUPPRESS)  # the child's
    a = p.parse_args()
    if a.variant:
        print(RESULT + json.dumps(child(a.variant, a.model, a.res, a.reps)))
        return
    rows = []
    for variant in VARIANTS:
        argv = [sys.executable, __file__, "--model", a.model, "--res", str(a.res), "--reps", str(a.reps)]
        done = subprocess.run([*argv, "--variant", variant], capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
        if done.returncode or not lines:
            error = (done.stderr.strip().splitlines() or ["no output"])[-1][:160]
            rows.append({"variant": variant, "model": a.model, "res": a.res, "median_ms": float("nan"),
                         "prepare_s": float("nan"), "sqnr_db": float("nan"), "error": error})  # fmt: skip
            continue
        rows.append({**json.loads(lines[-1][len(RESULT) :]), "error": ""})
    base = rows[0]["median_ms"]
    for r in rows:
        r["speedup_vs_fp32"] = base / r["median_ms"]
    name = f"torch_compile_{a.model.replace('zoo:', '')}_{a.res}"
    title = (
        f"torch.compile (inductor, freezing) vs eager and OpenVINO: {a.model} UNet, {a.res} px, batch 2 (each "
        "variant in its own process)"
    )
    columns = {
        "variant": "{variant}",
        "median ms": "{median_ms:.1f}",
        "vs fp32 eager": "{speedup_vs_fp32:.2f}x",
        "prepare (s)": "{prepare_s:.1f}",
        "SQNR vs fp32 (dB)": "{sqnr_db:.1f}",
        "error": "{error}",
    }
    write_report(rows, a.out, name, title, columns)


if __name__ == "__main__":
    main()
