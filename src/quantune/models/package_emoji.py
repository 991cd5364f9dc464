"""Package a trained emoji pipeline as zoo:emoji: fp16 safetensors in models/assets/emoji (<= 30 MB in all).

python -m quantune.models.package_emoji outputs/emoji_pretrain/pipeline
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from quantune.assets import EMOJI_DIR
from quantune.errors import QuantuneError
from quantune.io import DIFFUSERS_FOLDER, atomic_dir

LIMIT_MB = 30


def package(src: Path, dst: Path = EMOJI_DIR, training: dict | None = None) -> int:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(src), local_files_only=True)
    pipe.to(torch.float16)
    with atomic_dir(dst, DIFFUSERS_FOLDER, overwrite=True) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if training:
            (tmp / "TRAINING.json").write_text(json.dumps(training, indent=2, sort_keys=True) + "\n")
    size = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
    if size > LIMIT_MB * 2**20:
        raise QuantuneError(f"zoo:emoji is {size / 2**20:.1f} MB, over the {LIMIT_MB} MB budget: shrink the model")
    return size


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("pipeline")
    p.add_argument("--training-json", help="a JSON of how it was trained (steps, time, machine), shipped beside it")
    a = p.parse_args()
    info = json.loads(Path(a.training_json).read_text()) if a.training_json else None
    print(f"zoo:emoji packaged: {package(Path(a.pipeline), training=info) / 2**20:.1f} MB in {EMOJI_DIR}")
