"""Swap float layers for integer ones (`quantize_`), calibrate activation quantizers, save and load the result.

A quantized UNet is saved as a diffusers model folder whose safetensors hold the integer buffers (qweight, scale,
zero_point, shift, activation scales) and a `quantune_quant.json` listing every integer layer's `spec()`; any
safetensors reader sees the integers. `load_quantized_model(folder, cls)` rebuilds the model from its config,
puts empty integer layers where the layer specs say (each registered class's `from_spec`, quant/intlayer.py) and
loads the tensors strictly. `calibrate` runs the activation quantizers' observation protocol (quant/act.py).
See docs/intlora.md and docs/quantization.md.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from accelerate import init_empty_weights
from torch import nn

from quantune.errors import QuantuneError
from quantune.io import atomic_dir, load_safetensors
from quantune.modules import set_module
from quantune.quant.act import ActQuantizer, observe_activations
from quantune.quant.attention import quant_attentions, quantize_attention
from quantune.quant.config import QuantConfig
from quantune.quant.layers import _QuantWeight, layer_from_spec, quantizable, quantizable_names, quantize_layer

logger = logging.getLogger(__name__)
SPEC_FILE = "quantune_quant.json"
SPEC_FORMAT = "quantune-int"
# 1: before the check (some such files already hold `weight_split`); 2: written since; both read the same way.
# A reader takes every version up to its own; a file of a later one names the upgrade instead of half-loading.
SPEC_VERSION = 2


def quantize_(model: nn.Module, config: QuantConfig) -> list[str]:
    """Replace every targeted nn.Linear / nn.Conv2d of `model` (in place) by its integer layer; returns the names.

    LoRA factors (".lora_" names) are never quantized; a LoRA's frozen base (".base_layer") is, when targeted.
    """
    names = []
    for name, module in list(model.named_modules()):
        if not name or ".lora_" in name or isinstance(module, _QuantWeight) or not config.is_target(name):
            continue
        if quantizable(module):
            names.append(name)
        elif config.targets is not None and not any(True for _ in module.children()):
            raise QuantuneError(
                f"quantization target {name!r} is a {type(module).__name__}: only {quantizable_names()} can be "
                "quantized; change the targets or add it to exclude"
            )
    for name in names:
        set_module(model, name, quantize_layer(model.get_submodule(name), config.weight, config.act))
    logger.info("quantized %d layers to %d bits", len(names), config.weight.bits)
    return names


def act_quantizers(model: nn.Module) -> dict[str, ActQuantizer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ActQuantizer)}


def calibrate(model: nn.Module, run: Callable[[], object], only_missing: bool = False) -> int:
    """Calibrate the activation quantizers of `model` on what `run()` feeds it (no gradients); returns the count."""
    quantizers = {n: q for n, q in act_quantizers(model).items() if not (only_missing and bool(q.calibrated))}
    if not quantizers:
        return 0
    unseen = observe_activations(quantizers, run)
    if unseen:
        raise QuantuneError(f"calibration never reached {len(unseen)} quantized layers (e.g. {unseen[0]})")
    logger.info("calibrated %d activation quantizers", len(quantizers))
    return len(quantizers)


def quant_layers(model: nn.Module) -> dict[str, _QuantWeight]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _QuantWeight)}


def weight_memory(model: nn.Module) -> dict[str, int]:
    """Bytes held by integer weights (with scales) and by float parameters and buffers of `model`."""
    quant = quant_layers(model)
    int_bytes = sum(m.weight_bytes() for m in quant.values())
    inside = {id(t) for m in quant.values() for t in m.buffers()}
    float_bytes = sum(
        t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if id(t) not in inside
    )
    return {"integer": int_bytes, "float": float_bytes}


def write_spec(model, folder: Path) -> None:
    """The integer layers' specs, beside a saved model's weights (what load_quantized_model rebuilds from)."""

    specs = {name: layer.spec() for name, layer in quant_layers(model).items()}
    meta = {"format": SPEC_FORMAT, "version": SPEC_VERSION, "layers": specs, "attention": quant_attentions(model)}
    (folder / SPEC_FILE).write_text(json.dumps(meta, indent=1))


def save_quantized_model(model, folder: str | Path, overwrite: bool = False) -> Path:
    """Write a diffusers model (config + safetensors) holding integer layers, and the spec beside it (atomically);
    an earlier such folder is replaced only with `overwrite`."""
    with atomic_dir(folder, (SPEC_FILE,), overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        write_spec(model, tmp)
    return Path(folder)


def is_quantized_folder(folder: str | Path) -> bool:
    return (Path(folder) / SPEC_FILE).is_file()


def _from_spec(spec: dict) -> nn.Module:
    layer = layer_from_spec(spec)
    if layer is None:
        raise QuantuneError(f"unknown integer layer class {spec.get('class')!r} in {SPEC_FILE}: upgrade quantune")
    return layer


def _read_spec(path: Path) -> tuple[dict, dict]:
    """The layer specs and the whole of a quantune_quant.json, its format and version checked."""
    try:
        meta = json.loads(path.read_text())
        layers, fmt, version = meta["layers"], meta.get("format"), meta.get("version")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise QuantuneError(f"{path} is unreadable ({e}): re-export the quantized model") from None
    if fmt != SPEC_FORMAT:
        raise QuantuneError(f"{path} is not a quantune integer model (format {fmt!r}): re-export the quantized model")
    if not isinstance(layers, dict) or not isinstance(meta.get("attention", {}), dict):
        raise QuantuneError(f"{path}: its layers or attention are not a mapping; re-export the quantized model")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise QuantuneError(f"{path} has no valid spec version ({version!r}): re-export the quantized model")
    if version > SPEC_VERSION:
        raise QuantuneError(
            f"{path} is spec version {version}, written by a newer quantune (this one reads up to "
            f"{SPEC_VERSION}): upgrade quantune"
        )
    return layers, meta


def load_quantized_model(folder: str | Path, cls):
    """Rebuild a model class `cls` (e.g. UNet2DConditionModel) saved by save_quantized_model."""

    folder = Path(folder)
    layers, meta = _read_spec(folder / SPEC_FILE)
    config = cls.load_config(folder)
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (PixArt's positions) computed
        model = cls.from_config(config)
    for name, spec in layers.items():
        set_module(model, name, _from_spec(spec))
    if meta.get("attention"):
        for name, bits in meta["attention"].items():
            quantize_attention(model.get_submodule(name), bits)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise QuantuneError(f"{folder} has no .safetensors weights: re-export the quantized model")
    state = {}
    for f in files:
        state.update(load_safetensors(f)[0])
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        missing, unexpected = [str(e).splitlines()[-1].strip()], []
    if missing or unexpected:
        raise QuantuneError(
            f"{folder} does not match its {SPEC_FILE}: {len(missing)} missing, {len(unexpected)} unexpected tensors "
            f"(e.g. {(missing or unexpected)[0]}); re-export the quantized model"
        )
    if not all(bool(q.calibrated) for q in act_quantizers(model).values()):
        raise QuantuneError(f"{folder}: an activation quantizer was saved uncalibrated; re-export the model")
    return model.eval()
