"""Peak training memory (and step time) of full / lora / qlora / intlora-mul / intlora-shift, W8 and W4.

Each configuration runs in its own process: build the model (SD-1.5 UNet architecture, randomly initialised, or a
zoo model), apply the method exactly as `quantune train` does (train/methods.py, train/quant_methods.py), calibrate
A8 activation quantizers on one batch, then run two AdamW steps of the denoising loss on random latents. Peak
memory is measured over the training steps only: on CUDA torch.cuda.max_memory_allocated after a reset; on CPU the
process's VmHWM after malloc_trim and a reset (/proc/self/clear_refs), so the float model that is quantized at
set-up does not count. Quantized methods quantize every other UNet Linear / Conv2d too (as the reference) and use A8.

    python benchmarks/quant_train_memory.py [--model sd15|zoo:emoji-init] [--res 256] [--batch 1] [--search minmax]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from report import write_report

NO_CACHE = "quant.cache_aux=false"  # IntLoRA: regenerate R* every forward instead of keeping it (fp16)
ROWS = [
    ("full", 32, ""),
    ("lora", 32, ""),
    ("qlora", 8, ""),
    ("intlora-mul", 8, ""),
    ("intlora-shift", 8, ""),
    ("qlora", 4, ""),
    ("intlora-mul", 4, ""),
    ("intlora-shift", 4, ""),
    ("intlora-mul", 4, NO_CACHE),
    ("intlora-shift", 4, NO_CACHE),
]


def _rss_peak_reset() -> None:
    """Return freed heap pages to the OS (the float model quantized at set-up), then reset the peak RSS."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def _rss_peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_one(method: str, bits: int, model: str, res: int, batch: int, search: str, extra: str = "") -> dict:
    from train_step import build

    from quantune.models import build_tiny
    from quantune.train.config import resolve_config
    from quantune.train.registry import METHODS

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = build_tiny()
    pipe.unet, dim = build(model)
    sets = [f"method={method}", "task=" + ("full" if method == "full" else "text-to-image"), "lora.r=4"]
    if method not in ("full", "lora"):
        sets += [f"quant.bits={bits}", "quant.act_bits=8", "quant.quantize_rest=true", f"quant.search='{search}'"]
        sets += [extra] if extra else []
    cfg = resolve_config(None, sets)
    start = time.perf_counter()
    groups = METHODS[method]().prepare(pipe, cfg)
    setup_s = time.perf_counter() - start
    unet = pipe.unet.to(device).train()
    params = [p for g in groups for p in g["params"]]
    latent = res // 8 if model == "sd15" else res // 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    cond = torch.randn(batch, 77, dim, generator=g).to(device)
    METHODS[method]().calibrate(pipe, lambda: unet(x, t, cond))
    opt = torch.optim.AdamW(params, lr=1e-5)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mb = torch.cuda.memory_allocated() / 2**20
    else:
        _rss_peak_reset()
        base_mb = _rss_peak_mb()
    times = []
    for _ in range(2):
        s = time.perf_counter()
        loss = torch.nn.functional.mse_loss(unet(x, t, cond).sample.float(), x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - s)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _rss_peak_mb()
    trainable = sum(p.numel() for p in params)
    return {
        "method": method + (" (R* regenerated)" if extra == NO_CACHE else ""),
        "bits": bits,
        "model": model,
        "res": res,
        "batch": batch,
        "device": device.type,
        "setup_s": round(setup_s, 1),
        "step_s": round(times[-1], 2),
        "before_steps_mb": round(base_mb),
        "peak_mb": round(peak),
        "trainable_params": trainable,
        "loss": round(float(loss), 4),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="sd15")
    p.add_argument("--res", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--search", default="minmax", help="range search at set-up (memory does not depend on it)")
    p.add_argument("--only", help="METHOD:BITS[:KEY=VALUE] (internal: one configuration in this process)")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    if a.only:
        method, bits, *extra = a.only.split(":")
        print(json.dumps(run_one(method, int(bits), a.model, a.res, a.batch, a.search, *extra)))
        return
    rows = []
    for method, bits, extra in ROWS:
        argv = [
            sys.executable,
            __file__,
            "--only",
            f"{method}:{bits}:{extra}" if extra else f"{method}:{bits}",
            "--model",
            a.model,
            "--res",
            str(a.res),
            "--batch",
            str(a.batch),
            "--search",
            a.search,
        ]
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{method} W{bits} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    full = rows[0]["peak_mb"]
    for r in rows:
        r["vs_full"] = round(r["peak_mb"] / full, 3)
        r["weights"] = "fp32" if r["bits"] == 32 else f"W{r['bits']}A8"
    name = f"quant_train_memory_{a.model.replace(':', '_')}_{rows[0]['device']}"
    title = (
        f"Peak training memory, {a.model} UNet, {a.res} px, batch {a.batch}, two AdamW steps "
        f"({rows[0]['device']}, peak over the steps)"
    )
    columns = {
        "method": "{method}",
        "weights": "{weights}",
        "peak MB": "{peak_mb}",
        "vs full": "{vs_full}",
        "step s": "{step_s}",
        "trainable params": "{trainable_params:,}",
    }
    write_report(rows, a.out, name, title, columns)


if __name__ == "__main__":
    main()
