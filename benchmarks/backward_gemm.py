"""Benchmark: the activation gradient of a frozen integer layer in training, dL/dx = dL/dy W (conv: conv2d's input
gradient), in fp32, in bf16, and (Linear only) as an int8 GEMM, on the SD-1.5 UNet's layer shapes at 256 and
512 px, batch 1 (quant/train_kernels.py uses the result: `quant.backward_dtype`).

Each variant is the whole product from the stored integers, as a training backward runs it:
- fp32 / bf16: W dequantized from its codes into that dtype (`dequantize_as`), then the GEMM or conv2d_input;
- int8 (Linear): dL/dy's columns scaled by the weight's row scales, quantized per row to int8 (dynamic, symmetric),
  then torch._int_mm with W_int and the row scales back (what OneTrainer's int8 backward does).
Error: relative L2 error and cosine against the product in float64. Every variant in its own process (the allocator
as `quantune` sets it, allocator.py), median of --reps calls after a warm-up. Writes
benchmarks/results/backward_gemm.{csv,md}.

    python benchmarks/backward_gemm.py [--reps 10]
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
from pathlib import Path

import torch
from report import median_ms, write_report

VARIANTS = ["fp32", "bf16", "int8"]
RESULT = "RESULT "
# (name, kind, in, out, tokens or side at 256 px): SD-1.5's attention / feed-forward Linears and 3x3 ResNet convs
SHAPES = [("attn to_q 320", "linear", 320, 320, 1024), ("ff GEGLU proj 320", "linear", 320, 2560, 1024),
          ("attn to_out 1280", "linear", 1280, 1280, 64), ("resnet conv 320", "conv", 320, 320, 32),
          ("resnet conv 640", "conv", 640, 640, 16), ("resnet conv 1280", "conv", 1280, 1280, 8)]  # fmt: skip


def _layer(kind: str, c_in: int, c_out: int):
    from quantune.quant.layers import from_float

    float_layer = torch.nn.Linear(c_in, c_out) if kind == "linear" else torch.nn.Conv2d(c_in, c_out, 3, padding=1)
    return from_float(float_layer, 4, act_bits=8)  # W4 packed, as QLoRA W4A8's base


def _int8_input_grad(layer, grad: torch.Tensor) -> torch.Tensor:
    g = grad.reshape(-1, grad.shape[-1]) * layer.scale.reshape(1, -1)  # fold s_w[n] into dL/dy's columns
    step = g.abs().amax(1, keepdim=True).clamp_min(1e-30) / 127
    q = torch.round(g / step).to(torch.int8)
    w = layer.int_weight().to(torch.int8)  # [N, K]
    return (torch._int_mm(q, w).float() * step).reshape(*grad.shape[:-1], -1)


def _run(variant: str, layer, grad: torch.Tensor, x_shape) -> torch.Tensor:
    if variant == "int8":
        return _int8_input_grad(layer, grad)
    dtype = torch.float32 if variant == "fp32" else torch.bfloat16
    return layer.input_grad(grad.to(dtype), layer.dequantize_as(dtype), x_shape).float()


def child(variant: str, reps: int) -> list[dict]:
    from quantune.allocator import keep_freed_memory

    keep_freed_memory()
    rows = []
    for res in (256, 512):
        scale = (res // 256) ** 2
        for name, kind, c_in, c_out, size in SHAPES:
            torch.manual_seed(0)
            layer = _layer(kind, c_in, c_out)
            shape = f"{c_out}x{c_in}" + ("x3x3" if kind == "conv" else "")
            row = {"variant": variant, "res": res, "layer": name, "shape": shape}
            if variant == "int8" and kind == "conv":
                rows.append({**row, "median_ms": float("nan"), "rel_err": float("nan"), "cosine": float("nan"),
                             "note": "no int8 conv input gradient in PyTorch"})  # fmt: skip
                continue
            side = size * res // 256
            x_shape = (1, size * scale, c_in) if kind == "linear" else (1, c_in, side, side)
            grad = torch.randn(*x_shape[:-1], c_out) if kind == "linear" else torch.randn(1, c_out, side, side)
            exact = layer.input_grad(grad.double(), layer.dequantize().double(), x_shape)
            out = _run(variant, layer, grad, x_shape)
            err = float((out.double() - exact).norm() / exact.norm())
            cosine = float(torch.nn.functional.cosine_similarity(out.double().flatten(), exact.flatten(), dim=0))
            ms = median_ms(functools.partial(_run, variant, layer, grad, x_shape), reps)
            rows.append({**row, "median_ms": ms, "rel_err": err, "cosine": cosine, "note": ""})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--variant", help=argparse.SUPPRESS)  # the child's
    a = p.parse_args()
    if a.variant:
        print(RESULT + json.dumps(child(a.variant, a.reps)))
        return
    rows = []
    for variant in VARIANTS:
        done = subprocess.run([sys.executable, __file__, "--reps", str(a.reps), "--variant", variant],
                              capture_output=True, text=True, check=True)  # fmt: skip
        rows += json.loads(next(li for li in done.stdout.splitlines() if li.startswith(RESULT))[len(RESULT) :])
    fp32 = {(r["res"], r["layer"]): r["median_ms"] for r in rows if r["variant"] == "fp32"}
    for r in rows:
        r["vs_fp32"] = fp32[(r["res"], r["layer"])] / r["median_ms"]
    rows.sort(key=lambda r: (r["res"], SHAPES.index(next(s for s in SHAPES if s[0] == r["layer"])), r["variant"]))
    title = ("Activation gradient through a frozen W4 layer (dequantize + product), SD-1.5 UNet shapes, batch 1 "
             "(each variant in its own process)")  # fmt: skip
    columns = {"res": "{res}", "layer": "{layer}", "weight": "{shape}", "variant": "{variant}",
               "median ms": "{median_ms:.2f}", "speed vs fp32": "{vs_fp32:.2f}x", "rel. error": "{rel_err:.2e}",
               "cosine": "{cosine:.6f}", "note": "{note}"}  # fmt: skip
    write_report(rows, a.out, "backward_gemm", title, columns)


if __name__ == "__main__":
    main()
