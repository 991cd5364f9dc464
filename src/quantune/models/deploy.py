"""Which engine runs a pipeline's integer denoiser: OpenVINO (quant/ov_runtime.py) or PyTorch's integer kernels.

    backend "auto":     OpenVINO on the CPU when it is installed, else PyTorch (the reason logged)
            "openvino": OpenVINO, or one error line saying why it cannot
            "torch":    PyTorch (oneDNN / torch._int_mm kernels, quant/kernels.py)
OpenVINO is the default on the CPU because it measured faster on every integer model of the `inference` table
(docs/bench/inference.md: quantune's own integers and scales on OpenVINO's kernels). A float denoiser, and any
denoiser off the CPU, runs in PyTorch. `deploy` wraps or unwraps the denoiser in place (the PyTorch model stays the
wrapper's `.model`): LoRA attachment, training, merging and saving take the PyTorch model, so the loaders that do
those ask for "torch".
"""

from __future__ import annotations

import logging

import torch

from quantune.errors import QuantuneError
from quantune.families import family_of
from quantune.quant.ov_export import openvino_missing
from quantune.quant.ov_runtime import OpenVINOModule
from quantune.quant.quantize import quant_layers

logger = logging.getLogger(__name__)
BACKENDS = ("auto", "openvino", "torch")


def torch_denoiser(model):
    """The PyTorch model behind `model` (itself unless it is an OpenVINOModule)."""
    return model.model if isinstance(model, OpenVINOModule) else model


def deploy(pipe, backend: str = "auto") -> str:
    """Run the pipeline's denoiser on `backend` (module docstring); returns "openvino" or "torch" (what runs)."""
    if backend not in BACKENDS:
        raise QuantuneError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    name = family_of(pipe).denoiser
    model = torch_denoiser(getattr(pipe, name))
    reason = _torch_reason(model, backend)
    if reason is not None and backend == "openvino":
        raise QuantuneError(f"--backend openvino: {reason}; use --backend torch")
    if reason is not None:
        setattr(pipe, name, model)
        logger.info("the %s runs in PyTorch (%s)", name, reason)
        return "torch"
    if not isinstance(getattr(pipe, name), OpenVINOModule):
        setattr(pipe, name, OpenVINOModule(model))
    logger.info("the integer %s runs on OpenVINO (quantune's integers and scales)", name)
    return "openvino"


def _torch_reason(model, backend: str) -> str | None:
    if backend == "torch":
        return "backend torch"
    if not quant_layers(model):
        return "a float model"
    if getattr(model, "dtype", torch.float32) != torch.float32:
        return f"the OpenVINO export takes an fp32 model, this one is {model.dtype}"
    if any(b.device.type != "cpu" for b in model.buffers()):
        return f"OpenVINO runs on the CPU here, the model is on {next(model.buffers()).device}"
    return openvino_missing()


def backend_of(pipe) -> str:
    """What runs the pipeline's denoiser now: "openvino" or "torch"."""
    return "openvino" if isinstance(getattr(pipe, family_of(pipe).denoiser), OpenVINOModule) else "torch"


def describe_backend(pipe) -> str:
    """What runs the pipeline's denoiser, in words (the CLI prints it)."""
    model = getattr(pipe, family_of(pipe).denoiser)
    if isinstance(model, OpenVINOModule):
        calls = model.calls
        if calls["torch"] and not calls["openvino"]:
            return "PyTorch integer kernels (OpenVINO could not run it: see the log)"
        mixed = f", {calls['torch']} of {sum(calls.values())} calls in PyTorch" if calls["torch"] else ""
        return f"OpenVINO (quantune's integers and scales{mixed})"
    return "PyTorch integer kernels" if quant_layers(model) else "PyTorch"
