"""Package a trained emoji pipeline as a shipped zoo model: fp16 safetensors in models/assets.

- zoo:emoji: the whole StableDiffusionPipeline in models/assets/emoji (<= 30 MB in all);
- zoo:emoji-dit: the FLUX.1 transformer and its scheduler in models/assets/emoji-dit (<= 15 MB); its VAE and text
  encoders are zoo:emoji's, shared (families/flux.py).

python -m quantune.models.package_emoji [--zoo emoji | emoji-dit] PIPELINE [--training-json FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from quantune.assets import EMOJI_DIR, EMOJI_DIT_DIR
from quantune.errors import QuantuneError
from quantune.io import DIFFUSERS_FOLDER, atomic_dir

LIMIT_MB = {"emoji": 30, "emoji-dit": 15}
MARKERS = DIFFUSERS_FOLDER + ("transformer",)  # a zoo:emoji-dit folder holds a transformer/ and no model_index


def package(src: Path, dst: Path = EMOJI_DIR, training: dict | None = None, zoo: str = "emoji") -> int:
    """Write the fp16 weights of the pipeline folder `src` to `dst` (replacing it); returns the bytes written."""
    with atomic_dir(dst, MARKERS, overwrite=True) as tmp:
        if zoo == "emoji":
            from diffusers import StableDiffusionPipeline

            pipe = StableDiffusionPipeline.from_pretrained(str(src), local_files_only=True)
            pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
        else:
            from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

            transformer = FluxTransformer2DModel.from_pretrained(src / "transformer", local_files_only=True)
            transformer.register_to_config(_classifier_free_guidance=True)  # trained with caption dropout
            transformer.to(torch.float16).save_pretrained(tmp / "transformer", safe_serialization=True)
            FlowMatchEulerDiscreteScheduler.from_pretrained(src / "scheduler").save_pretrained(tmp / "scheduler")
        if training:
            (tmp / "TRAINING.json").write_text(json.dumps(training, indent=2, sort_keys=True) + "\n")
    size = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
    if size > LIMIT_MB[zoo] * 2**20:
        budget = LIMIT_MB[zoo]
        raise QuantuneError(f"zoo:{zoo} is {size / 2**20:.1f} MB, over its {budget} MB budget: shrink the model")
    return size


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("pipeline")
    p.add_argument("--zoo", choices=sorted(LIMIT_MB), default="emoji")
    p.add_argument("--training-json", help="a JSON of how it was trained (steps, time, machine), shipped beside it")
    a = p.parse_args()
    info = json.loads(Path(a.training_json).read_text()) if a.training_json else None
    dst = EMOJI_DIR if a.zoo == "emoji" else EMOJI_DIT_DIR
    size = package(Path(a.pipeline), dst, training=info, zoo=a.zoo)
    print(f"zoo:{a.zoo} packaged: {size / 2**20:.1f} MB in {dst}")
