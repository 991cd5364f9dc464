"""Benchmark: quality and cost of quantune's PTQ methods on zoo:emoji. FP vs W8A8 / W4A8 x minmax / qdiffusion /
eda-dm: FID against the FP model's samples and against the OpenMoji images (quantune's OpenMoji feature network),
PSNR / SSIM of each quantized sample against the FP sample of the same prompt and seed, the UNet's size on disk,
and each PTQ run's wall time and peak memory.

Each PTQ run is its own process (`--one METHOD BITS`: its peak memory is its own): quantize, save the integer
model, load it back (integer kernels prepared) and generate the same prompts and seeds as the FP model.

    python benchmarks/ptq_quality.py [--n 200] [--steps 20] [--calib-samples 128] [--iters 300] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from emoji_fid import generate
from report import write_report

BITS = {"W8A8": (8, 8), "W4A8": (4, 8)}


def prompts_and_reference(n: int) -> tuple[list[str], list]:
    from quantune.data import openmoji_dataset

    data = openmoji_dataset(size=32, subset="^(?!.*unicorn)")
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:n].tolist()
    return [data.captions[i] for i in pick], [data[i]["image"] for i in pick]


def run_one(a, method: str, bits: str, work: Path) -> None:
    """Quantize zoo:emoji, save, reload, generate; images + stats into `work`."""
    from quantune.models import load_pipeline
    from quantune.ptq import PTQConfig, quantize_pipeline, save_ptq_pipeline

    start = time.time()
    pipe = load_pipeline("zoo:emoji")
    wbits, abits = BITS[bits]
    cfg = PTQConfig(method=method, wbits=wbits, abits=abits, calib_samples=a.calib_samples, steps=a.steps,
                    iters=a.iters, guidance_scale=a.guidance)  # fmt: skip
    report = quantize_pipeline(pipe, cfg, progress=False)
    seconds = time.time() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = save_ptq_pipeline(pipe, work / "model", report)
    unet_bytes = sum(p.stat().st_size for p in (out / "unet").glob("*.safetensors"))
    pipe = load_pipeline(str(out))
    prompts, _ = prompts_and_reference(a.n)
    images = generate(pipe, prompts, a.steps, 32, a.guidance)
    for i, im in enumerate(images):
        im.save(work / f"{i:04d}.png")
    stats = {"ptq_seconds": seconds, "peak_mb": peak_mb, "unet_bytes": unet_bytes}
    stats["fp32_bytes"] = report["fp32_unet_bytes"]
    (work / "stats.json").write_text(json.dumps(stats))


def scores(images, fp_images, reference) -> dict:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    from quantune.eval import fid
    from quantune.eval.fid import to_batch

    x, y = to_batch(images), to_batch(fp_images)
    psnr = torch.stack([peak_signal_noise_ratio(x[i : i + 1], y[i : i + 1], data_range=1.0) for i in range(len(x))])
    return {
        "fid_vs_fp": fid(images, fp_images),
        "fid_vs_openmoji": fid(images, reference),
        "psnr_db": float(psnr.clamp_max(99).mean()),
        "ssim": float(structural_similarity_index_measure(x, y, data_range=1.0)),
    }


def main() -> None:
    from PIL import Image

    from quantune.models import load_pipeline

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--methods", default="minmax,qdiffusion,eda-dm")
    p.add_argument("--bits", default="W8A8,W4A8")
    p.add_argument("--one", nargs=3, metavar=("METHOD", "BITS", "DIR"), help=argparse.SUPPRESS)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    if a.one:
        run_one(a, a.one[0], a.one[1], Path(a.one[2]))
        return
    prompts, reference = prompts_and_reference(a.n)
    fp_images = generate(load_pipeline("zoo:emoji"), prompts, a.steps, 32, a.guidance)
    rows = [{"bits": "FP32", "method": "-", **scores(fp_images, fp_images, reference), "ptq_seconds": 0.0,
             "peak_mb": 0.0, "unet_mb": 0.0}]  # fmt: skip
    shared = ["--n", a.n, "--steps", a.steps, "--guidance", a.guidance, "--calib-samples", a.calib_samples,
              "--iters", a.iters]  # fmt: skip
    for bits in a.bits.split(","):
        for method in a.methods.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, __file__, *map(str, shared), "--one", method, bits, tmp]
                subprocess.run(cmd, check=True)
                stats = json.loads((Path(tmp) / "stats.json").read_text())
                images = [Image.open(f).convert("RGB") for f in sorted(Path(tmp).glob("*.png"))]
            rows[0]["unet_mb"] = stats["fp32_bytes"] / 2**20
            row = {"bits": bits, "method": method, **scores(images, fp_images, reference)}
            row.update(ptq_seconds=stats["ptq_seconds"], peak_mb=stats["peak_mb"], unet_mb=stats["unet_bytes"] / 2**20)
            print(row, flush=True)
            rows.append(row)
    for r in rows:
        r.update(n=a.n, steps=a.steps, calib_samples=a.calib_samples, iters=a.iters)
    title = (
        f"PTQ of zoo:emoji: {a.n} prompts, DDIM {a.steps} steps, guidance {a.guidance}; calibration {a.calib_samples} "
        f"trajectories, {a.iters} iterations per block; FID with the OpenMoji feature network"
    )
    columns = {
        "bits": "{bits}", "method": "{method}", "FID vs FP": "{fid_vs_fp:.2f}",
        "FID vs OpenMoji": "{fid_vs_openmoji:.2f}",
        "PSNR vs FP (dB)": "{psnr_db:.1f}", "SSIM vs FP": "{ssim:.3f}", "UNet on disk (MB)": "{unet_mb:.2f}",
        "PTQ time (s)": "{ptq_seconds:.0f}", "PTQ peak RSS (MB)": "{peak_mb:.0f}",
    }  # fmt: skip
    write_report(rows, a.out, "ptq_quality_emoji", title, columns)


if __name__ == "__main__":
    main()
