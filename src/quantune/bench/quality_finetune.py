"""Table 4b, fine-tuning quality on zoo:emoji: DreamBooth with a float or a quantized base (IntLoRA's Table 1
layout): lora, qlora + PTQ merge, intlora-mul and intlora-shift at W8A8 and W4A8.

Task: the demo's DreamBooth (configs/emoji_dreambooth.toml: the unicorn, held out of zoo:emoji's pretraining,
"a sks emoji", prior preservation), identical settings for every method; quantized methods quantize every UNet
Linear / Conv2d (quant.quantize_rest) with A8. After training the quantized runs are merged into integer models
(qlora: dequantize + add + re-quantize; intlora: the exact integer product / shift) and the merged models are what
is evaluated. Each run trains, merges and samples in its own process. Metrics (quantune.eval, OpenMoji feature
network): subject similarity, the mean cosine similarity of `n_subject` samples of "a sks emoji" to the instance
images (the DINO / CLIP-I protocol with the offline network), and FID of `n` samples of OpenMoji captions against
their glyphs (how much of the base model survives). A grid of the subject samples of each run is saved.

    python -m quantune.bench.quality_finetune [--quick] --out DIR
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import torch

from quantune.bench.common import Plot, Table, run_child, table_main
from quantune.bench.quality_ptq import Settings, fid_notes, prompts_and_reference, samples
from quantune.errors import QuantuneError
from quantune.families import family_of

logger = logging.getLogger(__name__)
CONFIG = Path("configs") / "emoji_dreambooth.toml"  # the repository's recipe, from the repository root (make bench)
RUNS = [  # label, method, weight bits (0: float base), quant.zero_fix
    ("LoRA, float base", "lora", 0, "none"),
    ("QLoRA W8A8 + PTQ merge", "qlora", 8, "none"),
    ("IntLoRA-MUL W8A8", "intlora-mul", 8, "none"),
    ("IntLoRA-SHIFT W8A8", "intlora-shift", 8, "none"),
    ("QLoRA W4A8 + PTQ merge", "qlora", 4, "none"),
    ("IntLoRA-MUL W4A8", "intlora-mul", 4, "none"),
    ("IntLoRA-SHIFT W4A8", "intlora-shift", 4, "none"),
    ("IntLoRA-MUL W4A8, mid-rise zero fix", "intlora-mul", 4, "midrise"),  # full run only
]
GRID_COLUMNS = 8


def settings(quick: bool) -> tuple[Settings, int, int]:
    """(sampling settings, training steps, subject samples)."""
    return (Settings(24, 10, 0, 0), 30, 8) if quick else (Settings(100, 20, 0, 0), 250, 16)


def instance(work: Path) -> list:
    from PIL import Image

    from quantune.demo import instance_images

    return [Image.open(p).convert("RGB") for p in instance_images(work / "instance")]


def evaluate(pipe, s: Settings, n_subject: int, work: Path) -> dict:
    from quantune.eval import fid, subject_similarity

    prompts, reference = prompts_and_reference(s.n)
    subject = samples(pipe, ["a sks emoji"] * n_subject, s)
    for i, im in enumerate(subject[:GRID_COLUMNS]):
        im.save(work / f"subject_{i}.png")
    return {"subject_similarity": subject_similarity(subject, instance(work)), "fid": fid(samples(pipe, prompts, s),
                                                                                         reference)}  # fmt: skip


@torch.no_grad()
def merge_error(run_dir: Path, family: str) -> float:
    """|W_merged - W_train| / |W_train - W_base| over the adapted layers: how much of the trained update the merge
    into an integer model loses (0: kept exactly). W_train: the weight the training forward used (QLoRA: the
    dequantized base + the LoRA delta; IntLoRA: the MUL / SHIFT weight W'); W_base: the same at B = 0."""
    from quantune.lora.inject import lora_layers
    from quantune.train.merge_run import load_run
    from quantune.train.quant_methods import intlora_layers, requantize

    cfg, pipe, _ = load_run(run_dir, family)
    err = upd = 0.0
    if family == "qlora":
        for layer in lora_layers(family_of(pipe).denoiser_of(pipe)).values():
            w_base = layer.base_layer.dequantize()
            w_train = w_base + layer.weight_update()
            w_merged = requantize(layer, cfg.quant.search).dequantize()
            err += float((w_merged - w_train).pow(2).sum())
            upd += float((w_train - w_base).pow(2).sum())
    else:
        for layer in intlora_layers(family_of(pipe).denoiser_of(pipe)).values():
            w_train = layer.adapted_weight()
            w_merged = layer.merge().dequantize().reshape(w_train.shape)
            b = layer.lora_B.detach().clone()
            layer.lora_B.zero_()
            w_base = layer.adapted_weight()
            layer.lora_B.copy_(b)
            err += float((w_merged - w_train).pow(2).sum())
            upd += float((w_train - w_base).pow(2).sum())
    return (err / upd) ** 0.5


def run_one(method: str, bits: int, zero_fix: str, steps: int, s: Settings, n_subject: int, work: Path) -> dict:
    from quantune.models import load_pipeline
    from quantune.train.config import resolve_config
    from quantune.train.merge_run import merge_run
    from quantune.train.trainer import train

    if not CONFIG.exists():
        raise QuantuneError(f"{CONFIG} is missing: run the benchmark from the root of a quantune checkout")
    run_dir = work / "run"
    sets = [f"output_dir={run_dir}", f"method={method}", f"data.path={work / 'instance'}",
            f"data.class_dir={work.parents[1] / 'class_images'}", f"train.steps={steps}", "log.tensorboard=false",
            "log.checkpoint_every=0", "log.validation_images=1", "log.validation_steps=10"]  # fmt: skip
    if method != "lora":
        sets += [f"quant.bits={bits}", "quant.act_bits=8", "quant.quantize_rest=true", f"quant.zero_fix='{zero_fix}'"]
    instance(work)
    start = time.time()
    train(resolve_config(str(CONFIG), sets))
    seconds = time.time() - start
    row = {"method": method, "bits": bits or 32, "train_s": seconds}
    if method == "lora":
        pipe = load_pipeline("zoo:emoji")
        pipe.load_lora_weights(str(run_dir / "pytorch_lora_weights.safetensors"))  # diffusers' own loader
    else:
        family = "intlora" if method.startswith("intlora") else "qlora"
        row["merge_error"] = merge_error(run_dir, family)
        merged, _ = merge_run(run_dir, work / "merged", family)
        pipe = load_pipeline(str(merged))
    return {**row, **evaluate(pipe, s, n_subject, work)}


def _subject_row(work: Path, n_subject: int) -> list:
    from PIL import Image

    return [Image.open(work / f"subject_{i}.png").convert("RGB") for i in range(min(GRID_COLUMNS, n_subject))]


def _class_images(folder: Path) -> None:
    """DreamBooth's prior-preservation images, generated by the base model as the trainer would."""
    from quantune.models import load_pipeline
    from quantune.train.config import resolve_config
    from quantune.train.data import ensure_class_images

    cfg = resolve_config(str(CONFIG), [])
    d = cfg.data
    pipe = load_pipeline("zoo:emoji")
    pipe.set_progress_bar_config(disable=True)
    ensure_class_images(pipe, folder, d.class_prompt, d.num_class_images, d.resolution, cfg.train.seed)


def table(quick: bool, out: Path) -> Table:
    from PIL import Image

    from quantune.io import make_grid
    from quantune.models import load_pipeline

    s, steps, n_subject = settings(quick)
    grid = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        _class_images(Path(tmp) / "class_images")  # shared by every run, so no run's time includes making them
        rows = [{"run": "zoo:emoji, no fine-tuning", "method": "-", "bits": 32, "train_s": 0.0,
                 **evaluate(load_pipeline("zoo:emoji"), s, n_subject, base)}]  # fmt: skip
        grid.append(_subject_row(base, n_subject))
        for label, method, bits, zero_fix in RUNS[:-1] if quick else RUNS:
            work = Path(tmp) / method / f"{bits}_{zero_fix}"
            work.mkdir(parents=True)
            args = ["--one", method, bits, zero_fix, steps, s.n, s.steps, n_subject, work]
            rows.append({"run": label, **run_child("quantune.bench.quality_finetune", args)})
            grid.append(_subject_row(work, n_subject))
    (out / "grids").mkdir(parents=True, exist_ok=True)
    make_grid(grid).resize((len(grid[0]) * 64, len(grid) * 64), Image.NEAREST).save(out / "grids" / "finetune.png")
    notes = fid_notes(s.n)
    return Table(
        "quality_finetune",
        f"DreamBooth on zoo:emoji (held-out unicorn, {steps} steps), merged models; subject similarity of {n_subject}"
        f" samples, FID of {s.n} samples vs OpenMoji, DDIM {s.steps}, guidance {s.guidance}",
        {"run": "{run}", "subject similarity (higher better)": "{subject_similarity:.4f}",
         "FID vs OpenMoji (lower better)": "{fid:.2f}", "merge error / update": "{merge_error:.4f}",
         "train (s)": "{train_s:.0f}"},
        rows,
        Plot("{run}", {"subject similarity": "subject_similarity", "FID vs OpenMoji": "fid"}),
        notes=notes + ["OpenMoji feature network for both metrics; one training run per row (seed 0): differences "
               "of a few thousandths in subject similarity are within run-to-run noise (not measured here)",
               "merge error / update: |W_merged - W_train| / |W_train - W_base| over the adapted layers (how much of "
               "the trained update the merge into an integer model loses; '-' for the float LoRA, not merged)",
               "grid rows: 'a sks emoji' samples of each row of the table, in order"],
        images=["grids/finetune.png"],
    )  # fmt: skip


def _one(method, bits, zero_fix, steps, n, sample_steps, n_subject, work) -> dict:
    s = Settings(int(n), int(sample_steps), 0, 0)
    return run_one(method, int(bits), zero_fix, int(steps), s, int(n_subject), Path(work))


def main() -> None:
    table_main(__doc__, table, _one, 8)


if __name__ == "__main__":
    main()
