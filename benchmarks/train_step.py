"""Benchmark: one LoRA training step, quantune vs the same step written as diffusers' train_text_to_image_lora.py
does it with peft (unet.add_adapter(peft.LoraConfig(...))), on the same model, batch, resolution, rank and targets.

Each variant runs in its own process (so peak memory is its own): warm-up steps, then the median of timed steps,
and the process's peak resident memory (CPU) or torch's peak allocated memory (CUDA). Writes CSV + Markdown.

    python benchmarks/train_step.py [--model zoo:emoji-init|sd15] [--batch 8] [--steps 10] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from report import write_report

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def sd15_unet():
    """The Stable Diffusion 1.5 UNet architecture, randomly initialised (no download)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
    )


def build(model: str):
    from quantune.models import load_pipeline

    if model == "sd15":
        torch.manual_seed(0)
        return sd15_unet(), 768
    pipe = load_pipeline(model)
    return pipe.unet, pipe.unet.config.cross_attention_dim


def run_variant(variant: str, model: str, batch: int, res: int, rank: int, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    unet, dim = build(model)
    unet.requires_grad_(False)
    if variant == "quantune":
        from quantune.lora import LoraConfig, add_lora, lora_parameters

        add_lora(unet, LoraConfig(r=rank, alpha=float(rank), targets=TARGETS, init="gaussian"))
        params = lora_parameters(unet)
    else:  # diffusers' train_text_to_image_lora.py
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGETS))
        params = [p for p in unet.parameters() if p.requires_grad]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unet.to(device).train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    latent = res // 8 if model == "sd15" else res // 4
    x = torch.randn(batch, 4, latent, latent, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    cond = torch.randn(batch, 77 if model == "sd15" else 16, dim, device=device)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = torch.nn.functional.mse_loss(unet(x, t, cond).sample, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "variant": variant,
        "median_s": statistics.median(times),
        "peak_mb": peak,
        "trainable": sum(p.numel() for p in params),
        "device": device.type,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="zoo:emoji-init")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.variant:
        print(json.dumps(run_variant(a.variant, a.model, a.batch, a.res, a.rank, a.steps, a.warmup)))
        return
    rows = []
    for variant in ("quantune", "diffusers+peft"):
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            variant,
            "--model",
            a.model,
            "--batch",
            str(a.batch),
            "--res",
            str(a.res),
            "--rank",
            str(a.rank),
            "--steps",
            str(a.steps),
            "--warmup",
            str(a.warmup),
        ]
        done = subprocess.run(
            cmd, capture_output=True, text=True, env=dict(os.environ, TRANSFORMERS_VERBOSITY="error")
        )
        if done.returncode:
            sys.exit(f"{variant} failed:\n{done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    peer = rows[1]
    for r in rows:
        r["time_vs_peer"] = r["median_s"] / peer["median_s"]
        r["memory_vs_peer"] = r["peak_mb"] / peer["peak_mb"]
    name = f"train_step_{a.model.replace(':', '_')}_{rows[0]['device']}"
    title = (
        f"LoRA training step, {a.model}, batch {a.batch}, {a.res} px, rank {a.rank}, targets {TARGETS}, "
        f"{rows[0]['device']}; median of {a.steps} steps after {a.warmup} warm-up"
    )
    columns = {
        "variant": "{variant}",
        "median step (s)": "{median_s:.4f}",
        "peak memory (MB)": "{peak_mb:.0f}",
        "trainable params": "{trainable}",
        "time vs peer": "{time_vs_peer:.2f}",
        "memory vs peer": "{memory_vs_peer:.2f}",
    }
    write_report(rows, a.out, name, title, columns)


if __name__ == "__main__":
    main()
