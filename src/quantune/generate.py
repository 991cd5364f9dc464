"""Image generation with LoRAs at chosen strengths, and the sample grid (cloneofsimo's alpha-scale demonstration:
one row per LoRA strength, the seeds fixed, so a row differs from the next only by the LoRA's strength)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from quantune.errors import QuantuneError
from quantune.families import family_of
from quantune.formats import read_lora
from quantune.io import atomic_dir, check_output, make_grid
from quantune.lora.bases import base_type
from quantune.lora.inject import lora_layers, set_lora_multiplier
from quantune.lora.layers import LoraModule
from quantune.lora.merge import merge_into, mix
from quantune.lora.weights import apply_lora, components_of

logger = logging.getLogger(__name__)


@dataclass
class LoraSpec:
    path: str
    scales: list[float]

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """'FILE', 'FILE:0.8' or 'FILE:0,0.5,1'; strengths must be finite numbers (a name that exists as a file,
        colon and all, is a file)."""
        head, sep, tail = text.rpartition(":")
        if not (sep and head) or Path(text).exists():
            return cls(text, [1.0])
        try:
            scales = [float(s) for s in tail.split(",")]
        except ValueError:
            raise QuantuneError(f"{text!r}: {tail!r} is not a strength: give FILE, FILE:0.8 or FILE:0,0.5,1") from None
        if not all(math.isfinite(x) for x in scales):
            raise QuantuneError(f"{text!r}: strengths must be finite numbers, not {tail!r}")
        return cls(head, scales)


def attach_loras(pipe, specs: list[LoraSpec]) -> list[float | None]:
    """Wrap the pipeline with the LoRAs; returns the strengths to sweep (one row each; None: one row as loaded, an
    embedded adapter at its own strength)."""
    if not specs:
        return [None]
    if any(lora_layers(model) for model in components_of(pipe).values()):
        raise QuantuneError("this model carries an embedded adapter (a `lora embed` folder): generate with it alone, "
                            "or embed the other adapter into its base model")  # fmt: skip
    if len(specs) == 1:
        weights, _, _ = read_lora(specs[0].path, pipe)
        apply_lora(pipe, weights)
        return specs[0].scales
    if any(len(s.scales) > 1 for s in specs):
        raise QuantuneError("several scales per LoRA are only allowed with a single --lora (one row per scale)")
    loras = [(read_lora(s.path, pipe)[0], s.scales[0]) for s in specs]
    if all(isinstance(m, LoraModule) and not m.soft for weights, _ in loras for m in weights.values()):
        combined, _ = mix(loras, "concat")  # exact: the sum of the weighted deltas
        apply_lora(pipe, combined)
    elif not _has_integer_layers(pipe):
        merge_into(pipe, loras)  # other types (LoHa, LoKr, DoRA): merged into the float weights, exactly
    else:
        raise QuantuneError("several LoHa / LoKr / DoRA files on an integer model would be re-quantized: give one "
                            "--lora, or merge them with `quantune lora merge` first")  # fmt: skip
    return [1.0]


def _has_integer_layers(pipe) -> bool:
    kinds = (base_type(m) for model in components_of(pipe).values() for m in model.modules())
    return any(kind is not None and kind.stored for kind in kinds)


MARKERS = ("grid.png",)  # an output folder `generate` wrote


def generate(
    pipe,
    prompt: str,
    out_dir,
    scales: list[float],
    steps: int = 20,
    seed: int = 0,
    size: int | None = None,
    num_images: int = 1,
    guidance_scale: float = 7.5,
    overwrite: bool = False,
) -> list[Path]:
    """Generate num_images per strength (fixed seeds seed..seed+K-1), save PNGs and grid.png; returns the paths.
    The folder is written whole, atomically; an existing one is replaced only with `overwrite`."""
    if steps < 1 or num_images < 1:
        raise QuantuneError("--steps and --num-images must be at least 1")
    out_dir = check_output(out_dir, overwrite, MARKERS)
    size = size or family_of(pipe).default_size(pipe)
    names, rows = [], []
    for i, scale in enumerate(scales):
        for model in components_of(pipe).values():
            if scale is not None:
                set_lora_multiplier(model, scale)
        generators = [torch.Generator().manual_seed(seed + k) for k in range(num_images)]
        images = pipe(
            [prompt] * num_images,
            num_inference_steps=steps,
            height=size,
            width=size,
            generator=generators,
            **family_of(pipe).guidance_kwargs(pipe, guidance_scale, num_images),
            **family_of(pipe).call_kwargs(pipe),
        ).images
        rows.append(images)
        names += [f"scale{scale:g}_seed{seed + k}.png" if len(scales) > 1 else f"seed{seed + k}.png"
                  for k in range(num_images)]  # fmt: skip
        strength = "as loaded" if scale is None else f"{scale:g}"
        logger.info("row %d: LoRA strength %s, %d image(s)", i, strength, num_images)
    with atomic_dir(out_dir, MARKERS, overwrite) as tmp:
        for name, image in zip(names, (img for row in rows for img in row)):
            image.save(tmp / name, format="PNG")
        make_grid(rows).save(tmp / "grid.png", format="PNG")
    return [out_dir / name for name in names] + [out_dir / "grid.png"]
