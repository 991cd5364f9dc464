"""Pipeline folders whose denoiser holds integers (IntLoRA / QLoRA merges, PTQ): written with the integer layers'
spec beside the weights, and read back with no float copy (quant/quantize.py holds the per-model save and load).
"""

from __future__ import annotations

import json
from pathlib import Path

from quantune.families import FAMILIES
from quantune.io import DIFFUSERS_FOLDER, atomic_dir
from quantune.quant.kernels import prepare_int_kernels
from quantune.quant.ov_runtime import OpenVINOModule
from quantune.quant.quantize import is_quantized_folder, load_quantized_model, quant_layers, write_spec


def denoiser_names() -> list[str]:
    """The pipeline components that hold a denoiser in some family ("unet", "transformer")."""
    return sorted({family.denoiser for family in FAMILIES.values()})


def save_integer_pipeline(pipe, out: str | Path, extra: dict | None = None, overwrite: bool = False) -> Path:
    """Write the pipeline (its denoiser holding integers) and its spec atomically; `extra`: files to add, by name
    (a dict is written as JSON, a callable is called with the file's path).
    An existing `out` is replaced only with `overwrite` (and only if it is a pipeline folder)."""
    wrapped = {n: m for n in denoiser_names() if isinstance(m := getattr(pipe, n, None), OpenVINOModule)}
    try:
        for name, wrapper in wrapped.items():  # a deployed denoiser is saved as its PyTorch model
            setattr(pipe, name, wrapper.model)
        with atomic_dir(out, DIFFUSERS_FOLDER, overwrite) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            for name in denoiser_names():
                model = getattr(pipe, name, None)
                if model is not None and quant_layers(model):
                    write_spec(model, tmp / name)
            for name, obj in (extra or {}).items():
                if callable(obj):
                    obj(tmp / name)
                else:
                    (tmp / name).write_text(json.dumps(obj, indent=1))
    finally:
        for name, wrapper in wrapped.items():
            setattr(pipe, name, wrapper)
    return Path(out)


def load_integer_components(path: Path, model_class) -> dict:
    """The integer denoisers of a pipeline folder, by component name, on the CPU's integer kernels."""
    found = {}
    for name in denoiser_names():
        if is_quantized_folder(path / name):
            found[name] = load_quantized_model(path / name, model_class(path / name))
            prepare_int_kernels(found[name])  # on CPU; `quantune generate` prepares again after moving the pipeline
    return found
