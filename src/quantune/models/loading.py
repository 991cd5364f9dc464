"""`load_pipeline(ref)`: a built-in `zoo:NAME`, a local diffusers folder, or a Hugging Face hub id."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import diffusers
import torch
from diffusers import DiffusionPipeline

from quantune.errors import QuantuneError
from quantune.families import zoo
from quantune.models.deploy import deploy, torch_denoiser
from quantune.models.embedded import attach_embedded, is_embedded
from quantune.models.integer import denoiser_names, load_integer_components
from quantune.quant.kernels import prepare_int_kernels
from quantune.quant.quantize import quant_layers

logger = logging.getLogger(__name__)


def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """'auto' picks CUDA when present; the dtype 'auto' is fp16 on CUDA and fp32 on CPU (CPU half is slow)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QuantuneError(f"--device {device}: CUDA is not available here; use --device cpu")
    names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype == "auto":
        return dev, torch.float16 if dev.type == "cuda" else torch.float32
    if dtype not in names:
        raise QuantuneError(f"unknown dtype {dtype!r}: choose auto, fp32, fp16 or bf16")
    return dev, names[dtype]


def to_device(pipe, device, backend: str | None = None):
    """Move a pipeline to `device`; an integer denoiser gets the integer kernels of that device (quant/kernels.py)
    and, given a `backend` (models/deploy.py), runs on it ("auto": OpenVINO on the CPU when installed)."""
    pipe.to(device)
    if torch.device(device).type != "cpu":
        for name in denoiser_names():
            model = getattr(pipe, name, None)
            if model is not None and quant_layers(torch_denoiser(model)):
                prepare_int_kernels(torch_denoiser(model))
    if backend is not None:
        deploy(pipe, backend)
    return pipe


def load_pipeline(ref: str, torch_dtype: torch.dtype | None = None, backend: str = "auto") -> DiffusionPipeline:
    """Load a diffusion pipeline by reference; every failure is a QuantuneError that names the fix. An integer
    denoiser (a PTQ / IntLoRA / QLoRA folder) runs on `backend` (models/deploy.py: "auto" is OpenVINO on the CPU
    when installed); loaders that train, merge or attach LoRAs ask for "torch"."""
    if ref.startswith("zoo:"):
        name = ref[4:]
        builders = zoo()  # asked each time: a family registered later brings its models
        if name not in builders:
            raise QuantuneError(
                f"unknown built-in model {ref!r}: choose one of {', '.join('zoo:' + k for k in builders)}"
            )
        pipe = builders[name]()
    elif Path(ref).exists():
        pipe = _load_folder(Path(ref), torch_dtype)
    elif ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        raise QuantuneError(f"no such model folder: {ref} (give a diffusers folder, a hub id 'org/name', or zoo:tiny)")
    else:
        pipe = _load_hub(ref, torch_dtype)
    if torch_dtype is not None:
        pipe.to(dtype=torch_dtype)
    if Path(ref).is_dir() and is_embedded(ref):  # an adapter kept in place (quantune lora embed), in its own dtypes
        attach_embedded(pipe, ref)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    if any(quant_layers(getattr(pipe, n)) for n in denoiser_names() if getattr(pipe, n, None) is not None):
        deploy(pipe, backend)
    return pipe


def _load_folder(path: Path, torch_dtype: torch.dtype | None) -> DiffusionPipeline:
    if not (path / "model_index.json").is_file():
        raise QuantuneError(
            f"{path} is not a diffusers pipeline folder (no model_index.json): save one with "
            "`pipe.save_pretrained(DIR)` or `quantune lora merge ... --out DIR`"
        )
    extra = load_integer_components(path, _model_class)  # integer denoisers (intlora/qlora merges, PTQ)
    try:
        return DiffusionPipeline.from_pretrained(str(path), torch_dtype=torch_dtype, local_files_only=True, **extra)
    except (OSError, ValueError, KeyError) as e:
        raise QuantuneError(f"could not load the pipeline in {path}: {str(e).splitlines()[0]}") from None


def _model_class(folder: Path) -> type:
    """The diffusers model class named in a saved model's config.json (UNet2DConditionModel, UNet2DModel, ...)."""
    try:
        name = str(json.loads((folder / "config.json").read_text())["_class_name"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise QuantuneError(f"{folder / 'config.json'} is unreadable ({e}): re-export the quantized model") from None
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise QuantuneError(f"{folder} holds a {name!r}, which this diffusers does not have: upgrade diffusers")
    return cls


def _load_hub(repo_id: str, torch_dtype: torch.dtype | None) -> DiffusionPipeline:
    try:  # the local cache first: no network needed when the model was downloaded before
        return DiffusionPipeline.from_pretrained(repo_id, torch_dtype=torch_dtype, local_files_only=True)
    except (OSError, ValueError):
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise QuantuneError(
            f"{repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: download it where "
            f"there is network (`hf download {repo_id} --local-dir DIR`) and pass --model DIR"
        )
    try:
        return DiffusionPipeline.from_pretrained(repo_id, torch_dtype=torch_dtype)
    except Exception as e:  # network errors come in many types (OSError, httpx, requests)
        logger.debug("hub load failed", exc_info=True)
        raise QuantuneError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}): check the id and the "
            f"network, or download it elsewhere (`hf download {repo_id} --local-dir DIR`) and pass --model DIR"
        ) from None
