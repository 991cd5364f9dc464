"""Benchmark: the ways to run quantune's W8A8 integer UNet on OpenVINO, against NNCF's INT8 of the same float UNet.

The SD-1.5 UNet architecture (random weights, batch 2, --res px), minmax W8A8 on two random batches (as the
`inference` table), then, each compiled for the CPU with OpenVINO's defaults and timed in this one process (median
of --reps after a warm-up):
- quantune's export (quant/ov_export.py) with the attention products "calibrated" (P quantized, un-fused MatMuls),
  "fused" (q / k / v quantized, one SDPA) and "float" (products unquantized), SQNR against PyTorch's integer
  kernels (the eager reference);
- NNCF (`nncf.quantize` of the float UNet on the same two batches): defaults, and model_type TRANSFORMER;
- OpenVINO's float UNet (the conversion without quantization) at OpenVINO's default inference precision, bf16 on a
  CPU with native bf16 (this project's: the row of benchmarks/results/openvino_export_256.md labelled "openvino
  fp32" ran so).
Writes CSV + Markdown (benchmarks/results/openvino_export*.{csv,md}).

    python benchmarks/openvino_export.py [--res 256] [--reps 5] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import time

import torch
from report import median_ms, write_report


def compiled_row(name: str, make, inputs, reference, reps: int) -> dict:
    """Convert (timed), compile and time one OpenVINO model; its SQNR against `reference`."""
    import openvino as ov

    from quantune.quant.primitives import sqnr_db

    start = time.perf_counter()
    compiled = ov.Core().compile_model(make(), "CPU")
    prepare = time.perf_counter() - start
    arrays = [t.numpy() for t in inputs]
    out = torch.from_numpy(compiled(arrays)[0].copy())
    return {"variant": name, "median_ms": median_ms(lambda: compiled(arrays), reps), "prepare_s": prepare,
            "sqnr_vs_eager_db": sqnr_db(reference, out)}  # fmt: skip


def main() -> None:
    import openvino as ov

    from quantune.bench.inference import denoiser_kwargs, prediction, quantune_int
    from quantune.bench.models import build
    from quantune.bench.openvino_peer import nncf_converter
    from quantune.quant.ov_runtime import _Traced, export_converter, flat_inputs

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--res", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    bm = build("sd15")
    calib = [denoiser_kwargs(bm, 2, a.res, seed=s) for s in (1, 2)]
    kwargs = denoiser_kwargs(bm, 2, a.res)
    fp = bm.denoiser.eval().requires_grad_(False)
    inputs = flat_inputs(fp, kwargs)
    rows = []
    with torch.no_grad():
        rows.append(compiled_row("openvino float UNet (default precision)", lambda: ov.convert_model(
            _Traced(fp, kwargs), example_input=tuple(inputs)), inputs, prediction(fp(**kwargs)), a.reps))  # fmt: skip
        for smooth in (False, True):
            convert = nncf_converter(calib, smooth)
            name = "nncf INT8 " + ("(model_type TRANSFORMER)" if smooth else "(defaults)")
            rows.append(compiled_row(name, lambda c=convert: c(fp, kwargs, inputs)[0], inputs,
                                     prediction(fp(**kwargs)), a.reps))  # fmt: skip
        model = quantune_int(fp, calib, 8, 8)
        eager = prediction(model(**kwargs))
        rows.append(
            {
                "variant": "quantune W8A8, PyTorch oneDNN kernels",
                "median_ms": median_ms(lambda: model(**kwargs), a.reps),
                "prepare_s": float("nan"),
                "sqnr_vs_eager_db": float("inf"),
            }
        )
        for attention in ("calibrated", "fused", "float"):
            rows.append(compiled_row(f"quantune W8A8 on OpenVINO, attention {attention}",
                                     lambda at=attention: export_converter(model, kwargs, inputs, at)[0], inputs,
                                     eager, a.reps))  # fmt: skip
    for r in rows:
        r["res"] = a.res
    write_report(rows, a.out, f"openvino_export_{a.res}",
                 f"quantune's W8A8 SD-1.5 UNet on OpenVINO vs NNCF INT8, {a.res} px, batch 2 (ms, one process; "
                 "NNCF rows' SQNR is against the float UNet, quantune's against its PyTorch integer kernels)",
                 {"variant": "{variant}", "median ms": "{median_ms:.1f}", "prepare (s)": "{prepare_s:.1f}",
                  "SQNR (dB)": "{sqnr_vs_eager_db:.1f}"})  # fmt: skip


if __name__ == "__main__":
    main()
