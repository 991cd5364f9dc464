"""`make demo`: the LoRA toolkit end to end on zoo:tiny, offline, in about a minute on a 2-core CPU.

It fits two small LoRAs on OpenMoji subsets, saves one in the quantune format, converts it to diffusers, peft and
kohya and back (checking that diffusers' own loader reproduces quantune's outputs), merges it into the base, mixes
the two LoRAs three ways, extracts a LoRA back from the merged model, and generates the strength grid. Every step
is the same call the CLI makes, and it prints the equivalent command and the sizes of what it wrote.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import time
from pathlib import Path

import torch


def _say(text: str) -> None:
    print(text, flush=True)


def _cli(command: str) -> None:
    from quantune.cli import main

    argv = shlex.split(command)
    _say(f"$ quantune {command}")
    if main(argv) != 0:
        raise SystemExit(f"demo step failed: quantune {' '.join(argv)}")


def fit_lora(subset: str, steps: int, seed: int, out: Path) -> Path:
    """Fit a LoRA on the UNet (attention + 3x3 resnet convs, LoCon) and the text encoder of zoo:tiny."""
    from quantune import LoraConfig, add_lora, load_pipeline, save_lora
    from quantune.data import openmoji_dataset, to_tensor
    from quantune.lora import TEXT_ENCODER_TARGETS, lora_parameters
    from quantune.train.objective import denoising_loss, latent_params, sample_latents

    pipe = load_pipeline("zoo:tiny")
    data = openmoji_dataset(size=32, subset=subset)
    # 32 px: zoo:tiny's attention at the 16x16 latent is 16x cheaper than at 64 px (32x32), the demo stays fast
    pixels = torch.stack([to_tensor(data[i]["image"], 32) for i in range(len(data))])  # [N, 3, 32, 32]
    captions = data.captions
    unet_cfg = LoraConfig(r=4, alpha=4.0, targets=r".*(to_q|to_k|to_v|to_out\.0|resnets\.\d+\.conv1)", seed=seed)
    add_lora(pipe.unet, unet_cfg)
    add_lora(pipe.text_encoder, LoraConfig(r=4, alpha=4.0, targets=TEXT_ENCODER_TARGETS, seed=seed))
    params = lora_parameters(pipe.unet) + lora_parameters(pipe.text_encoder)
    opt = torch.optim.AdamW(params, lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(data), (4,), generator=g)
        latents = sample_latents(pipe, latent_params(pipe, pixels[idx]), g)
        loss = denoising_loss(pipe, latents, [captions[i] for i in idx], g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    _say(f"fitted a LoRA on {len(data)} OpenMoji '{subset}' images, {steps} steps: loss {first:.4f} -> {last:.4f}")
    save_lora(pipe, out, config=unet_cfg)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--steps", type=int, default=60)
    a = p.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    start = time.time()

    _say("== 1. fit two LoRAs on zoo:tiny (a random Stable-Diffusion-architecture pipeline) ==")
    cat = fit_lora("cat", a.steps, 0, out / "cat.safetensors")
    apple = fit_lora("apple", a.steps, 1, out / "apple.safetensors")
    _cli(f"lora inspect {cat}")

    _say("\n== 2. export in every format, and back ==")
    _cli(f"lora convert {cat} --to diffusers --out {out}/cat_diffusers.safetensors")
    _cli(f"lora convert {cat} --to peft --out {out}/cat_peft")
    _cli(f"lora convert {cat} --to kohya --out {out}/cat_kohya.safetensors")
    _cli(f"lora convert {out}/cat_kohya.safetensors --to quantune --out {out}/cat_back.safetensors --model zoo:tiny")
    check_interop(cat, out)

    _say("\n== 3. merge into the base, mix two LoRAs, extract one back ==")
    _cli(f"lora merge --model zoo:tiny --lora {cat}:1.0 --out {out}/merged")
    _cli(f"lora mix {cat}:0.5 {apple}:0.5 --mode sum --out {out}/mix_sum.safetensors")
    _cli(f"lora mix {cat}:0.5 {apple}:0.5 --mode concat --out {out}/mix_concat.safetensors")
    _cli(f"lora mix {cat}:0.5 {apple}:0.5 --mode svd --rank 4 --out {out}/mix_svd.safetensors")
    extracted = out / "extracted.safetensors"
    _cli(f"lora extract --base zoo:tiny --tuned {out}/merged --rank 4 --clamp-quantile 1 --out {extracted}")

    _say("\n== 4. the strength grid (one row per LoRA strength, seeds fixed) ==")
    _cli(
        f"generate --model zoo:tiny --lora {cat}:0,0.5,1,1.5 --prompt 'cat face' --steps 10 --num-images 4 "
        f"--out {out}/grid"
    )

    _say(f"\nall outputs in {out} ({time.time() - start:.0f} s):")
    from quantune.formats.inspect import disk_size
    from quantune.io import human_size

    for path in sorted(out.iterdir()):
        _say(f"  {path.name:32s} {human_size(disk_size(path)):>10s}")


def check_interop(cat: Path, out: Path) -> None:
    """diffusers' own loader on the exported files gives quantune's outputs."""
    from quantune import load_lora
    from quantune.models import build_tiny

    torch.manual_seed(0)
    x, t = torch.randn(1, 4, 32, 32), torch.tensor([500])

    @torch.no_grad()
    def outputs(pipe):
        ids = pipe.tokenizer(["cat face"], padding="max_length", return_tensors="pt").input_ids
        return pipe.unet(x, t, pipe.text_encoder(ids)[0]).sample

    mine = build_tiny()
    load_lora(cat, into=mine)
    reference = outputs(mine)
    for name in ("cat_diffusers.safetensors", "cat_kohya.safetensors"):
        theirs = build_tiny()
        theirs.load_lora_weights(str(out / name))
        diff = float((outputs(theirs) - reference).abs().max())
        _say(f"  diffusers.load_lora_weights({name}): max |UNet output - quantune's| = {diff:.2e}")


if __name__ == "__main__":
    main()
