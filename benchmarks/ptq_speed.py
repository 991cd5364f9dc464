"""Benchmark: UNet forward latency of the integer model quantune's PTQ writes, against fp32, bf16 autocast and the
quantizers a user would pick instead: torchao (Int8DynamicActivationInt8WeightConfig) and optimum-quanto (qint8
weights and activations). Each variant runs in its own process (what ran before cannot slow it down; in one shared
process the same code measured 4.3 s and 5.3 s at 512 px on two runs) on the same seeded inputs; medians of
`--reps` timed forwards after a warm-up, speed-ups against fp32 and ratios against quantune, plus each output's
SQNR against fp32's (saved by the fp32 process).

The model is the Stable Diffusion 1.5 UNet architecture, randomly initialised (no download: speed is real,
quality is not), at batch 2 (classifier-free guidance) by default. quantune's variant is calibrated the way
`quantune quantize --method minmax` does (the speed of the integer model does not depend on the method), on
random inputs here. Peers: `pip install -c constraints.txt -r benchmarks/requirements.txt`.

    python benchmarks/ptq_speed.py [--model sd15|zoo:emoji] [--res 512] [--batch 2] [--reps 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import torch
from report import write_report
from train_step import build

logging.basicConfig(level=logging.INFO, format="%(message)s")
log = logging.getLogger("ptq_speed")


def inputs(unet, dim: int, batch: int, res: int, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    side = res // 8
    x = torch.randn(batch, unet.config.in_channels, side, side, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    ehs = torch.randn(batch, 77 if dim == 768 else 16, dim, generator=g)
    return x, t, ehs


def quantune_w8a8(unet, calib: list[tuple]):
    """minmax W8A8 with quantized attention, exported to integers, kernels prepared (as `quantune quantize`)."""
    from quantune.ptq import PTQConfig
    from quantune.ptq.act_lsq import LSQActQuantizer
    from quantune.ptq.wrap import export_integer, set_quant, shortcut_splits, wrap_for_ptq
    from quantune.quant.kernels import prepare_int_kernels

    cfg = PTQConfig(method="minmax")
    with torch.no_grad():
        splits = shortcut_splits(unet, lambda: unet(*calib[0]))
        wrap_for_ptq(unet, cfg, splits)
        set_quant(unet, False)
        quantizers = [m for m in unet.modules() if isinstance(m, LSQActQuantizer)]
        for q in quantizers:
            q.observing = True
        for args in calib:
            unet(*args)
        for q in quantizers:
            q.observing = False
        set_quant(unet, True)
        export_integer(unet)
    ways = prepare_int_kernels(unet)
    log.info("quantune kernels: %s", dict(ways))
    return unet


def torchao_w8a8(unet, calib):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantize_(unet, Int8DynamicActivationInt8WeightConfig())
    return unet


def quanto_w8a8(unet, calib):
    from optimum.quanto import Calibration, freeze, qint8, quantize

    quantize(unet, weights=qint8, activations=qint8)
    with torch.no_grad(), Calibration():
        for args in calib:
            unet(*args)
    freeze(unet)
    return unet


class Bf16:
    """fp32 weights, bf16 autocast: the float speed-up a CPU user with AVX512-BF16 / AMX may pick instead."""

    def __init__(self, unet):
        self.unet = unet

    def __call__(self, *args):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.unet(*args)


VARIANTS = {
    "fp32": lambda unet, calib: unet,
    "bf16 autocast": lambda unet, calib: Bf16(unet),
    "quantune W8A8": quantune_w8a8,
    "torchao int8 dyn": torchao_w8a8,
    "quanto W8A8": quanto_w8a8,
}


def timed(model, args, reps: int, warmup: int) -> tuple[float, torch.Tensor]:
    with torch.inference_mode():
        for _ in range(warmup):
            out = model(*args)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            out = model(*args)
            times.append(time.perf_counter() - start)
    return statistics.median(times), out.sample.float()


def run_variant(a, name: str, ref_file: str) -> dict:
    from quantune.quant.primitives import sqnr_db

    torch.manual_seed(0)
    base, dim = build(a.model)
    base.eval().requires_grad_(False)
    args = inputs(base, dim, a.batch, a.res)
    calib = [inputs(base, dim, a.batch, a.res, seed=s) for s in (1, 2)]
    start = time.perf_counter()
    model = VARIANTS[name](base, calib)
    prep = time.perf_counter() - start
    seconds, out = timed(model, args, a.reps, a.warmup)
    if name == "fp32":
        torch.save(out, ref_file)
    return {"variant": name, "median_ms": seconds * 1000, "prepare_s": prep,
            "sqnr_db": sqnr_db(torch.load(ref_file, weights_only=True), out)}  # fmt: skip


def main() -> None:
    import json
    import subprocess
    import sys
    import tempfile

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="sd15")
    p.add_argument("--res", type=int, default=512, help="image side in px (latents are res / 8)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS))
    p.add_argument("--one", nargs=2, metavar=("VARIANT", "REF_FILE"), help=argparse.SUPPRESS)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    if a.one:
        print("RESULT " + json.dumps(run_variant(a, *a.one)), flush=True)
        return
    rows = []
    names = ["fp32"] + [v for v in a.variants if v != "fp32"]  # fp32 first: its output is the SQNR reference
    with tempfile.TemporaryDirectory() as tmp:
        ref = str(Path(tmp) / "fp32_out.pt")
        for name in names:
            cmd = [sys.executable, __file__, "--model", a.model, "--res", str(a.res), "--batch", str(a.batch),
                   "--reps", str(a.reps), "--warmup", str(a.warmup), "--one", name, ref]  # fmt: skip
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
            log.info("%s: %.0f ms (prepare %.0f s)", name, rows[-1]["median_ms"], rows[-1]["prepare_s"])
    fp32 = rows[0]["median_ms"]
    ours = next((r["median_ms"] for r in rows if r["variant"] == "quantune W8A8"), None)
    for r in rows:
        r["speedup_vs_fp32"] = fp32 / r["median_ms"]
        r["quantune_ahead_x"] = r["median_ms"] / ours if ours else float("nan")
        r.update(model=a.model, res=a.res, batch=a.batch, reps=a.reps)
    write_report(
        rows, a.out, f"ptq_speed_{a.model.replace(':', '_')}_{a.res}_cpu",
        f"UNet forward latency, {a.model} at {a.res} px, batch {a.batch}, median of {a.reps}, one process per variant",
        {"variant": "{variant}", "median ms": "{median_ms:.0f}", "speed-up vs fp32": "{speedup_vs_fp32:.2f}x",
         "quantune ahead by": "{quantune_ahead_x:.2f}x", "SQNR vs fp32 (dB)": "{sqnr_db:.1f}",
         "prepare (s)": "{prepare_s:.1f}"},
    )  # fmt: skip


if __name__ == "__main__":
    main()
