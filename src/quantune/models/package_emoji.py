"""Package a trained emoji pipeline as a shipped zoo model: fp16 safetensors in models/assets.

- zoo:emoji: the whole StableDiffusionPipeline in models/assets/emoji (<= 30 MB in all);
- zoo:emoji-dit: the FLUX.1 transformer and its scheduler in models/assets/emoji-dit (<= 15 MB), with `parts.json`:
  the sha256 of the zoo:emoji VAE and text encoder it was trained on, which it borrows when it loads
  (families/flux.py checks them, so a repackaged zoo:emoji cannot silently change zoo:emoji-dit).

python -m quantune.models.package_emoji [--zoo emoji | emoji-dit] PIPELINE [--training-json FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from quantune.assets import EMOJI_DIR, EMOJI_DIT_DIR, emoji_parts
from quantune.errors import QuantuneError
from quantune.io import DIFFUSERS_FOLDER, atomic_dir

LIMIT_MB = {"emoji": 30, "emoji-dit": 15}
DESTS = {"emoji": EMOJI_DIR, "emoji-dit": EMOJI_DIT_DIR}
MARKERS = {"emoji": DIFFUSERS_FOLDER, "emoji-dit": ("parts.json",)}  # what a folder of that kind holds


def package(src: Path, dst: Path | None = None, training: dict | None = None, zoo: str = "emoji") -> int:
    """Write the fp16 weights of the pipeline folder `src` to `dst` (the zoo model's asset folder by default,
    replaced); returns the bytes written. Nothing is replaced when the model is over its budget."""
    if zoo not in LIMIT_MB:
        raise QuantuneError(f"unknown zoo model {zoo!r}: choose one of {', '.join(LIMIT_MB)}")
    dst = DESTS[zoo] if dst is None else dst
    with atomic_dir(dst, MARKERS[zoo], overwrite=True) as tmp:
        (_write_emoji if zoo == "emoji" else _write_emoji_dit)(Path(src), tmp)
        if training:
            (tmp / "TRAINING.json").write_text(json.dumps(training, indent=2, sort_keys=True) + "\n")
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        if size > LIMIT_MB[zoo] * 2**20:
            budget = LIMIT_MB[zoo]
            raise QuantuneError(f"zoo:{zoo} is {size / 2**20:.1f} MB, over its {budget} MB budget: shrink the model")
    return size


def _write_emoji(src: Path, tmp: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(src), local_files_only=True)
    pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)


def _write_emoji_dit(src: Path, tmp: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    if not (src / "transformer" / "config.json").is_file() or not (src / "scheduler").is_dir():
        raise QuantuneError(f"{src} is not a FLUX pipeline folder (transformer/, scheduler/): pass a run's pipeline")
    transformer = FluxTransformer2DModel.from_pretrained(src / "transformer", local_files_only=True)
    transformer.register_to_config(_classifier_free_guidance=True)  # trained with caption dropout
    transformer.to(torch.float16).save_pretrained(tmp / "transformer", safe_serialization=True)
    FlowMatchEulerDiscreteScheduler.from_pretrained(src / "scheduler", local_files_only=True).save_pretrained(
        tmp / "scheduler"
    )
    (tmp / "parts.json").write_text(json.dumps(emoji_parts(), indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("pipeline")
    p.add_argument("--zoo", choices=sorted(LIMIT_MB), default="emoji")
    p.add_argument("--training-json", help="a JSON of how it was trained (steps, time, machine), shipped beside it")
    a = p.parse_args()
    info = json.loads(Path(a.training_json).read_text()) if a.training_json else None
    size = package(Path(a.pipeline), training=info, zoo=a.zoo)
    print(f"zoo:{a.zoo} packaged: {size / 2**20:.1f} MB in {DESTS[a.zoo]}")
