"""Quality of DreamBooth on zoo:emoji with a float or a quantized base: lora, qlora + PTQ merge, intlora-mul and
intlora-shift at W8A8 and W4A8 (and the mid-rise zero fix), in one table.

Task: the demo's DreamBooth (configs/emoji_dreambooth.toml: the unicorn, held out of zoo:emoji's pretraining,
"a sks emoji", prior preservation), identical settings for every method; quantized methods quantize every UNet
Linear / Conv2d (quant.quantize_rest) with A8. After training, the quantized runs are merged into integer models
(`quantune qlora merge`: dequantize + add + re-quantize; `quantune intlora merge`: exact integer product/shift) and
the merged models are what is evaluated. Metrics (quantune.eval, OpenMoji feature network):
- subject similarity: mean cosine similarity of features of N_s samples of "a sks emoji" to the instance images
  (the DINO / CLIP-I protocol with the offline network);
- FID of N samples of OpenMoji captions against those glyphs (how much of the base model survives).

    python benchmarks/intlora_quality.py [--steps 250] [--n 200] [--n-subject 16] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from emoji_fid import generate
from report import write_report

RUNS = [
    ("LoRA, float base", "lora", 0, "none"),
    ("QLoRA W8A8 + PTQ merge", "qlora", 8, "none"),
    ("IntLoRA-MUL W8A8", "intlora-mul", 8, "none"),
    ("IntLoRA-SHIFT W8A8", "intlora-shift", 8, "none"),
    ("QLoRA W4A8 + PTQ merge", "qlora", 4, "none"),
    ("IntLoRA-MUL W4A8", "intlora-mul", 4, "none"),
    ("IntLoRA-SHIFT W4A8", "intlora-shift", 4, "none"),
    ("IntLoRA-MUL W4A8, mid-rise fix", "intlora-mul", 4, "midrise"),
]


def trained_pipeline(run_dir: Path, method: str):
    from quantune.models import load_pipeline
    from quantune.quant.merge_run import merge_run

    if method == "lora":
        pipe = load_pipeline("zoo:emoji")
        pipe.load_lora_weights(str(run_dir / "pytorch_lora_weights.safetensors"))  # diffusers' own loader
        return pipe
    merged, _ = merge_run(run_dir, run_dir / "merged", "intlora" if method.startswith("intlora") else "qlora")
    return load_pipeline(str(merged))


def main() -> None:
    from PIL import Image

    from quantune.data import openmoji_dataset
    from quantune.demo import instance_images
    from quantune.eval import fid, subject_similarity
    from quantune.models import load_pipeline
    from quantune.train.config import resolve_config
    from quantune.train.trainer import train

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--n-subject", type=int, default=16)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--work", default="outputs/intlora_quality")
    p.add_argument("--only", nargs="*", help="run only these methods (names as in the config)")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    work = Path(a.work)
    instance = [Image.open(path).convert("RGB") for path in instance_images(work / "instance")]
    data = openmoji_dataset(size=32, subset="^(?!.*unicorn)")
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[: a.n].tolist()
    prompts, reference = [data.captions[i] for i in pick], [data[i]["image"] for i in pick]

    def evaluate(pipe) -> dict:
        pipe.set_progress_bar_config(disable=True)
        subject = generate(pipe, ["a sks emoji"] * a.n_subject, a.sample_steps, 32, a.guidance)
        return {
            "subject_similarity": subject_similarity(subject, instance),
            "fid": fid(generate(pipe, prompts, a.sample_steps, 32, a.guidance), reference),
        }

    rows = [
        {
            "run": "zoo:emoji, no fine-tuning",
            "method": "-",
            "bits": 32,
            "train_s": 0.0,
            **evaluate(load_pipeline("zoo:emoji")),
        }
    ]
    print(rows[-1], flush=True)
    for label, method, bits, zero_fix in RUNS:
        if a.only and method not in a.only:
            continue
        run_dir = work / label.split(",")[0].replace(" ", "_").replace("+", "").lower() / zero_fix
        sets = [
            f"output_dir={run_dir}",
            f"method={method}",
            f"data.path={work / 'instance'}",
            f"data.class_dir={work / 'class_images'}",
            f"train.steps={a.steps}",
            "log.tensorboard=false",
            "log.checkpoint_every=0",
            "log.validation_images=1",
            "log.validation_steps=10",
        ]
        if method != "lora":
            sets += [
                f"quant.bits={bits}",
                "quant.act_bits=8",
                "quant.quantize_rest=true",
                f"quant.zero_fix='{zero_fix}'",
            ]
        start = time.time()
        train(resolve_config("configs/emoji_dreambooth.toml", sets))
        seconds = time.time() - start
        rows.append(
            {
                "run": label,
                "method": method,
                "bits": bits or 32,
                "train_s": round(seconds),
                **evaluate(trained_pipeline(run_dir, method)),
            }
        )
        print(rows[-1], flush=True)
    title = (
        f"DreamBooth on zoo:emoji (held-out unicorn, {a.steps} steps), merged models; subject similarity of "
        f"{a.n_subject} samples, FID of {a.n} samples vs OpenMoji (OpenMoji features), DDIM {a.sample_steps}, "
        f"guidance {a.guidance}"
    )
    columns = {
        "run": "{run}",
        "subject similarity (higher better)": "{subject_similarity:.4f}",
        "FID (lower better)": "{fid:.2f}",
        "train s": "{train_s}",
    }
    write_report(rows, a.out, "intlora_quality", title, columns)


if __name__ == "__main__":
    main()
