"""LoRA file formats: detection, reading into canonical weights, writing from them.

| format     | read | write | layout                                                                      |
|------------|------|-------|-----------------------------------------------------------------------------|
| quantune   | yes  | yes   | safetensors, "<component>.<path>.lora_down/up.weight" + ".alpha", metadata |
| diffusers  | yes  | yes   | safetensors, "unet.<path>.lora_A/B.weight" + lora_adapter_metadata         |
| peft       | yes  | yes   | folder per component: adapter_config.json + adapter_model.safetensors      |
| kohya      | yes  | yes   | safetensors, "lora_unet_<path>.lora_down/up.weight" + ".alpha"             |
| comfyui    | yes  | yes   | safetensors, "diffusion_model.<original name>.lora_down/up.weight" + alpha |
| cloneofsimo| yes  | no    | .pt positional list, or safetensors "unet:{i}:up/down" (needs the model)   |
| lora_wrapper| yes | no    | torch checkpoint of CompVis names ".lora_A/.lora_B/.lora_scale"            |
"""

from __future__ import annotations

from pathlib import Path

from quantune.errors import QuantuneError
from quantune.formats import comfyui, diffusers_format, kohya, legacy, peft_format, quantune_format
from quantune.io import check_output, load_pickle, load_safetensors, save_safetensors
from quantune.lora.weights import LoraWeights, canonicalize, components_of

WRITABLE = ("quantune", "diffusers", "peft", "kohya", "comfyui")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def detect_format(path) -> str:
    """The format of a LoRA file or folder, from its keys and metadata (never from its name alone)."""
    path = Path(path)
    if path.is_dir():
        if peft_format.is_peft_dir(path):
            return "peft"
        if (path / "pytorch_lora_weights.safetensors").is_file():
            return detect_format(path / "pytorch_lora_weights.safetensors")
        raise QuantuneError(f"{path} is a folder with no adapter_config.json or pytorch_lora_weights.safetensors")
    if not path.exists():
        raise QuantuneError(f"no such file: {path}")
    if path.suffix in PICKLE_SUFFIXES:
        obj = load_pickle(path)
        return _pickle_kind(obj, path)
    sd, meta = load_safetensors(path)
    return _safetensors_kind(sd, meta, path)


def _safetensors_kind(sd: dict, meta: dict, path) -> str:
    keys = list(sd)
    if meta.get("format") == quantune_format.FORMAT_NAME:
        return "quantune"
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return "kohya"
    if comfyui.is_comfyui(keys):
        return "comfyui"
    if keys and all(":" in k for k in keys):
        return "cloneofsimo"
    if any(k.startswith("base_model.model.") for k in keys):
        return "peft-file"
    if any(k.split(".")[0] in ("unet", "text_encoder", "text_encoder_2", "transformer") for k in keys):
        return "diffusers"
    raise QuantuneError(
        f"unknown LoRA format in {path} (first keys: {', '.join(keys[:3]) or 'none'}): quantune reads quantune, "
        "diffusers, peft, kohya, comfyui, cloneofsimo and lora_wrapper files"
    )


def _pickle_kind(obj, path) -> str:
    if isinstance(obj, list):
        return "cloneofsimo"
    if isinstance(obj, dict):
        sd = obj.get("state_dict", obj) if isinstance(obj.get("state_dict"), dict) else obj
        if any(str(k).endswith((".lora_A", ".lora_B.weight", ".lora_scale")) for k in sd):
            return "lora_wrapper"
    raise QuantuneError(f"unknown LoRA pickle {path}: quantune reads cloneofsimo lists and lora_wrapper checkpoints")


def read_lora(path, pipe=None, component: str = "unet") -> tuple[LoraWeights, str, dict]:
    """Read any supported LoRA into canonical weights: (weights, format name, metadata).

    `pipe` (a pipeline or model) is needed for positional cloneofsimo files, lora_wrapper's CompVis names, and
    to restore kohya names exactly; `component` says which part a bare peft folder or a cloneofsimo .pt is for.
    """
    path = Path(path)
    fmt = detect_format(path)
    components = components_of(pipe) if pipe is not None else {}
    meta: dict = {}
    if fmt == "peft":
        weights = peft_format.load_peft(path, component)
    elif fmt in ("cloneofsimo", "lora_wrapper") and pipe is None:
        raise QuantuneError(f"{path} is a {fmt} file, which can only be read against its model: pass --model REF")
    elif path.suffix in PICKLE_SUFFIXES:
        obj = load_pickle(path)
        if fmt == "cloneofsimo":
            weights = legacy.from_cloneofsimo_list(obj, components[component], component)
        else:
            lpb = getattr(getattr(components.get("unet"), "config", None), "layers_per_block", 2)
            lpb = lpb if isinstance(lpb, int) else lpb[0]
            weights = legacy.fix_conv_shapes(legacy.from_lora_wrapper(obj, lpb), components)
    else:
        if path.is_dir():
            path = path / "pytorch_lora_weights.safetensors"
        sd, meta = load_safetensors(path)
        if fmt == "quantune":
            weights = quantune_format.from_state_dict(sd, meta)
        elif fmt == "kohya":
            weights = kohya.from_kohya(sd, components)
        elif fmt == "comfyui":
            weights = comfyui.from_comfyui(sd, components)
        elif fmt == "cloneofsimo":
            weights = legacy.from_cloneofsimo_safetensors(sd, meta, components)
        elif fmt == "peft-file":
            sd = {f"{component}.{k.removeprefix('base_model.model.')}": v for k, v in sd.items()}
            weights, fmt = diffusers_format.from_diffusers(sd, {}), "peft"
        else:
            weights = diffusers_format.from_diffusers(sd, meta)
    if not weights:
        raise QuantuneError(f"{path} holds no LoRA modules")
    for key, mod in weights.items():  # the file's own consistency, once, for every format
        mod.check(key)
    if pipe is not None:
        weights = canonicalize(weights, pipe)
    return weights, fmt, meta


def lora_output(path, fmt: str, overwrite: bool = False) -> Path:
    """The file (or, for peft, the folder) `write_lora(..., path, fmt)` writes, checked before anything is read:
    a `path` not ending in .safetensors is a folder that gets the format's usual file name inside it (a file the
    user has there is replaced only with `overwrite`)."""
    if fmt not in WRITABLE:
        raise QuantuneError(f"cannot write format {fmt!r}: choose one of {', '.join(WRITABLE)}")
    path = Path(path)
    if fmt == "peft":
        return check_output(path, overwrite, peft_format.PEFT_MARKERS)
    if path.suffix != ".safetensors":
        path = path / ("pytorch_lora_weights.safetensors" if fmt == "diffusers" else "lora.safetensors")
    return check_output(path, overwrite, folder=False)


def write_lora(
    weights: LoraWeights, path, fmt: str, config_json: str | None = None, pipe=None, overwrite: bool = False
) -> Path:
    """Write canonical weights in `fmt`; returns the file or folder written (atomically; see `lora_output` for
    where, and for what `overwrite` allows). `pipe` (optional) tells the kohya and comfyui writers the denoiser's
    layout (an SDXL UNet is named as Stability's, a transformer by its original checkpoint); a transformer needs it."""
    path = lora_output(path, fmt, overwrite)
    if not weights:
        raise QuantuneError("there is no LoRA to write")
    if fmt == "peft":
        peft_format.save_peft(weights, path, overwrite)
        return path
    if fmt == "quantune":
        quantune_format.save_lora(weights, path, config_json)
        return path
    if fmt == "diffusers":
        sd, meta = diffusers_format.to_diffusers(weights)
    else:
        parts = components_of(pipe) if pipe is not None else {}
        if fmt == "comfyui":
            sd, meta = comfyui.to_comfyui(weights, parts)
        else:
            sd, meta = kohya.to_kohya(weights, parts.get("unet") or parts.get("transformer"))
    save_safetensors(sd, path, meta)
    return path
