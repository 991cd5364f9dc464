"""Injecting LoRA layers into a model by config, and taking them out again.

`add_lora(model, config)` wraps every targeted nn.Linear / nn.Conv2d in a LoraLayer (in place) and freezes the
rest; `remove_lora(model)` puts each original module object back, so the module tree and its state_dict are
exactly the original (a merged layer is unmerged first unless `merge=True` bakes the update in).
"""

from __future__ import annotations

import difflib
import logging

import torch
from torch import nn

from quantune.errors import QuantuneError
from quantune.lora.adapter import ADAPTERS, AdapterLayer
from quantune.lora.bases import base_type
from quantune.lora.config import LoraConfig
from quantune.lora.dora import decompose
from quantune.modules import set_module

logger = logging.getLogger(__name__)


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules the config adapts; an error listing close names when nothing matches."""
    names = []
    for name, module in model.named_modules():
        if not name or isinstance(module, AdapterLayer) or ".base_layer" in name or ".lora_" in name:
            continue
        if not config.is_target(name):
            continue
        if base_type(module) is not None:  # float or integer Linear / Conv2d (lora/bases.py)
            names.append(name)
        elif not any(True for _ in module.children()):  # a leaf of another type is a mistake; containers are skipped
            raise QuantuneError(
                f"target {name!r} is a {type(module).__name__}: LoRA adapts nn.Linear and nn.Conv2d only (float or "
                "integer); change LoraConfig.targets or add it to exclude"
            )
    if not names:
        raise QuantuneError(f"no module matches targets {config.targets!r}{_close_names(model, config.targets)}")
    return names


def _close_names(model: nn.Module, targets: str | list[str]) -> str:
    leaves = [n for n, m in model.named_modules() if base_type(m) is not None]
    suffixes = sorted({".".join(n.split(".")[-k:]) for n in leaves for k in (1, 2)})
    queries = [targets] if isinstance(targets, str) else list(targets)
    close = []
    for q in queries:
        close += difflib.get_close_matches(q, suffixes, n=4, cutoff=0.5)
        close += difflib.get_close_matches(q, leaves, n=2, cutoff=0.6)
    close = list(dict.fromkeys(close))[:8] or suffixes[:8]
    return f"; Linear/Conv2d names close to it: {', '.join(close)}"


def add_lora(model: nn.Module, config: LoraConfig, freeze_base: bool = True) -> list[str]:
    """Wrap the targeted layers of `model` in adapter layers of `config.type` (LoraLayer for "lora"; DoRA's
    decomposition on top when `config.dora`), in place; returns the adapted module names."""
    names = find_targets(model, config)
    adapter = ADAPTERS[config.type]
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    if freeze_base:
        model.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        layer = adapter.new_layer(base, config.rank_for(name), config.alpha_for(name), config, generator)
        if config.dora:
            decompose(layer)
        set_module(model, name, layer)
    logger.info("added %s%s to %d modules (r=%d)", config.type, " + DoRA" if config.dora else "", len(names), config.r)
    return names


def lora_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Adapted module name -> its adapter layer (LoraLayer, or another adapter type's)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def set_lora_multiplier(model: nn.Module, multiplier: float) -> None:
    """Set the run-time strength of every (unmerged) LoRA layer in `model`."""
    for layer in lora_layers(model).values():
        if layer.merged:
            raise QuantuneError("cannot change the LoRA multiplier of a merged layer: unmerge it first")
        layer.multiplier = float(multiplier)


def merge_lora(model: nn.Module, safe: bool = True) -> None:
    for layer in lora_layers(model).values():
        layer.merge(safe=safe)


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


def remove_lora(model: nn.Module, merge: bool = False) -> int:
    """Put the original modules back; merge=True folds the LoRA into their weights first. Returns the count."""
    layers = lora_layers(model)
    for name, layer in layers.items():
        if merge:
            layer.merge(safe=True)
        else:
            layer.unmerge()
        set_module(model, name, layer.base_layer)
    return len(layers)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of the LoRA layers (A, B and a trainable scale)."""
    params = []
    for layer in lora_layers(model).values():
        params += [p for n, p in layer.named_parameters() if not n.startswith("base_layer.")]
    return params
