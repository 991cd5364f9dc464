"""`make demo`: DreamBooth LoRA on zoo:emoji, then the LoRA toolkit on the result, offline on a 2-core CPU.

1. The subject: the unicorn emoji, held out of zoo:emoji's pretraining, as 4 instance images (shifted/scaled).
2. `quantune train configs/emoji_dreambooth.toml`: LoRA on UNet + text encoder, prior preservation on generated
   "an emoji" images.
3. Before/after grids (same seeds) for a few prompts.
4. The toolkit on the trained LoRA: inspect, convert to diffusers / peft / kohya and back (diffusers' own loader
   checked against quantune's outputs), merge into the base, extract it back, and the strength grid.
5. IntLoRA-MUL at W4A8: the same DreamBooth on a 4-bit integer base, `quantune intlora merge` into a model whose
   UNet holds integers (no post-training quantization), and a grid: float LoRA vs the merged integer model.
6. Post-training quantization of the LoRA-merged model with EDA-DM at W8A8 (`quantune quantize`, a short budget)
   into an integer model run on int8 kernels, and a grid: the float merged model vs its integer version.
Every step prints the equivalent command; the end prints steps, time, peak memory, adapter size and output paths.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import shutil
import time
from pathlib import Path

import torch
from PIL import Image

from quantune import cli
from quantune.api import load_lora
from quantune.data import openmoji_dataset
from quantune.errors import QuantuneError
from quantune.families import family_of
from quantune.formats import read_lora
from quantune.formats.inspect import disk_size
from quantune.io import check_output, human_size, make_grid, save_png
from quantune.lora.weights import apply_lora
from quantune.models import load_pipeline
from quantune.models.deploy import describe_backend

SUBJECT = "unicorn face"
DEMO_MARKER = ".quantune-demo"  # the file every demo run writes first into its --out


def _say(text: str) -> None:
    print(text, flush=True)


def _cli(command: str) -> None:
    _say(f"$ quantune {command}")
    if cli.main(shlex.split(command)) != 0:
        raise SystemExit(f"demo step failed: quantune {command}")


def instance_images(folder: Path, subject: str = SUBJECT) -> list[Path]:
    """4 views of a subject the model never saw (the held-out unicorn, or an OpenMoji sequence by its id such as
    '1F43B-200D-2744-FE0F'): the glyph at 4 scales/offsets, as a photographer would vary a subject."""

    glyph = openmoji_dataset(size=128, subset=[subject], include_sequences="-" in subject)[0]["image"]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (scale, dx, dy) in enumerate([(1.0, 0, 0), (0.85, 6, 4), (0.9, -5, 3), (0.8, 0, -6)]):
        canvas = Image.new("RGB", (128, 128), "white")
        side = int(128 * scale)
        canvas.paste(glyph.resize((side, side), Image.LANCZOS), ((128 - side) // 2 + dx, (128 - side) // 2 + dy))
        paths.append(folder / f"subject_{i}.png")
        canvas.resize((32, 32), Image.LANCZOS).save(paths[-1])
    return paths


def with_lora(lora: Path):
    tuned = load_pipeline("zoo:emoji")
    apply_lora(tuned, read_lora(lora, tuned)[0])
    return tuned


@torch.no_grad()
def side_by_side(pipes: list, prompts: list[str], path: Path, n: int = 4, steps: int = 25) -> Path:
    """Rows: prompts; columns: n seeds of each pipeline in turn (the same seeds)."""

    rows = []
    for prompt in prompts:
        row = []
        for pipe in pipes:
            gens = [torch.Generator().manual_seed(s) for s in range(n)]
            row += pipe([prompt] * n, num_inference_steps=steps, generator=gens).images
        rows.append(row)
    save_png(make_grid([[im.resize((64, 64)) for im in row] for row in rows]), path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    p.add_argument("--config", default="configs/emoji_dreambooth.toml", help="the DreamBooth recipe (TOML)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo's --out folder")
    a = p.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    config = Path(a.config)
    if not config.is_file():
        raise SystemExit(f"error: no recipe at {config}: run the demo from the repository root or pass --config FILE")
    out = Path(a.out)
    try:
        check_output(out, a.overwrite, (DEMO_MARKER,))
    except QuantuneError as e:
        raise SystemExit(f"error: {e}") from None
    if out.exists() and any(out.iterdir()):
        _say(f"replacing the previous demo output in {out} (--overwrite)")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / DEMO_MARKER).write_text("written by `python -m quantune.demo`; --overwrite replaces this folder\n")
    start = time.time()
    extra = f" --set train.steps={a.steps}" if a.steps else ""
    prompts = ["a sks emoji", "an emoji", "cat face"]
    run = dreambooth(config, out, extra, prompts)
    lora = run / "lora.safetensors"
    toolkit(lora, out)
    intlora(config, out, run, extra, lora, prompts)
    post_training_quantization(out, prompts)
    summary(out, run, lora, start)


def dreambooth(config: Path, out: Path, extra: str, prompts: list[str]) -> Path:
    """Steps 1-3: the subject's images, the DreamBooth LoRA, the before / after grid; returns the run folder."""

    _say(f"== 1. the subject: '{SUBJECT}', held out of zoo:emoji's pretraining ==")
    instance = instance_images(out / "instance")
    _say(f"wrote {len(instance)} instance images to {out / 'instance'}")
    _say("\n== 2. DreamBooth LoRA with prior preservation ==")
    run = out / "dreambooth"
    _cli(f"train {config} --set output_dir={run} --set data.path={out / 'instance'}{extra}")
    _say("\n== 3. before / after (left: zoo:emoji, right: + LoRA; same seeds) ==")
    pipes = [load_pipeline("zoo:emoji"), with_lora(run / "lora.safetensors")]
    _say(f"wrote {side_by_side(pipes, prompts, out / 'before_after.png')}")
    return run


def toolkit(lora: Path, out: Path) -> None:
    """Step 4: inspect, convert every way (diffusers' loader checked), merge, extract, the strength grid."""
    _say("\n== 4. the LoRA toolkit on the trained adapter ==")
    _cli(f"lora inspect {lora}")
    _cli(f"lora convert {lora} --to diffusers --out {out}/lora_diffusers.safetensors")
    _cli(f"lora convert {lora} --to peft --out {out}/lora_peft")
    _cli(f"lora convert {lora} --to kohya --out {out}/lora_kohya.safetensors")
    _cli(
        f"lora convert {out}/lora_kohya.safetensors --to quantune --out {out}/lora_back.safetensors --model zoo:emoji"
    )
    check_interop(lora, out)
    _cli(f"lora merge --model zoo:emoji --lora {lora}:1.0 --out {out}/merged")
    _cli(
        f"lora extract --base zoo:emoji --tuned {out}/merged --rank 8 --clamp-quantile 1 "
        f"--out {out}/extracted.safetensors"
    )
    _cli(
        f"generate --model zoo:emoji --lora {lora}:0,0.5,1 --prompt 'a sks emoji' --steps 25 --num-images 4 "
        f"--out {out}/strength_grid"
    )


def intlora(config: Path, out: Path, run: Path, extra: str, lora: Path, prompts: list[str]) -> None:
    """Step 5: IntLoRA-MUL W4A8 DreamBooth, merged into an integer model; grid against the float LoRA."""

    _say("\n== 5. IntLoRA-MUL W4A8: the same DreamBooth on a 4-bit integer base, merged into integers ==")
    int_run = out / "intlora"
    quant = "--set method=intlora-mul --set quant.bits=4 --set quant.act_bits=8 --set quant.quantize_rest=true"
    _cli(
        f"train {config} --set output_dir={int_run} --set data.path={out / 'instance'} "
        f"--set data.class_dir={run / 'class_images'} {quant}{extra}"
    )
    _cli(f"intlora merge {int_run} --out {out}/intlora_merged")
    merged = load_pipeline(str(out / "intlora_merged"))
    grid = side_by_side([with_lora(lora), merged], prompts, out / "lora_vs_intlora_w4a8.png")
    _say(f"wrote {grid} (left: float LoRA; right: IntLoRA-MUL W4A8 merged integer model, run by "
         f"{describe_backend(merged)})")  # fmt: skip


def post_training_quantization(out: Path, prompts: list[str]) -> None:
    """Step 6: EDA-DM W8A8 of the LoRA-merged model on int8 kernels; grid float vs integer."""

    _say("\n== 6. EDA-DM W8A8 post-training quantization of the merged model, run on int8 kernels ==")
    _cli(
        f"quantize --model {out}/merged --method eda-dm --wbits 8 --abits 8 --calib-samples 64 --steps 20 "
        f"--iters 50 --guidance 4 --out {out}/ptq_w8a8"
    )
    ptq = load_pipeline(str(out / "ptq_w8a8"))
    grid = side_by_side([load_pipeline(str(out / "merged")), ptq], prompts, out / "merged_vs_ptq_w8a8.png")
    _say(f"wrote {grid} (left: float LoRA-merged model; right: its EDA-DM W8A8 integer model, run by "
         f"{describe_backend(ptq)})")  # fmt: skip


def summary(out: Path, run: Path, lora: Path, start: float) -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    _say(f"\n== summary: {time.time() - start:.0f} s, peak memory {peak:.0f} MB ==")
    _say(f"  training: {(run / 'result.json').read_text().strip()}")
    _say(f"  adapter: {lora} ({human_size(disk_size(lora))})")
    for path in sorted(p for p in out.iterdir() if not p.name.startswith(".")):
        _say(f"  {path.name:28s} {human_size(disk_size(path)):>10s}")


def check_interop(lora: Path, out: Path) -> None:
    """diffusers' own loader on the exported files gives quantune's UNet outputs."""

    torch.manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])

    @torch.no_grad()
    def outputs(pipe):
        family = family_of(pipe)
        cond = family.condition(pipe, ["a sks emoji"], (family.default_size(pipe),) * 2)
        return family.predict(pipe, family.denoiser_of(pipe), x, t, cond)

    mine = load_pipeline("zoo:emoji")
    load_lora(lora, into=mine)
    reference = outputs(mine)
    for name in ("lora_diffusers.safetensors", "lora_kohya.safetensors"):
        theirs = load_pipeline("zoo:emoji")
        theirs.load_lora_weights(str(out / name))
        diff = float((outputs(theirs) - reference).abs().max())
        _say(f"  diffusers.load_lora_weights({name}): max |UNet output - quantune's| = {diff:.2e}")


if __name__ == "__main__":
    main()
