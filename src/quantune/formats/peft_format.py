"""peft's adapter folder (`PeftModel.save_pretrained` / `PeftModel.from_pretrained`), converted by hand both ways.

A peft adapter is per model, so quantune writes one folder per pipeline component:
OUT/<component>/adapter_config.json + adapter_model.safetensors, with keys "base_model.model.<path>.lora_A.weight"
and a LoraConfig whose target_modules lists the adapted paths and whose rank_pattern / alpha_pattern reproduce
per-module ranks and alphas exactly. `PeftModel.from_pretrained(pipe.unet, "OUT/unet")` loads it. DoRA is peft's
LoraConfig(use_dora=True) with "...lora_magnitude_vector" beside each LoRA; LoHa and LoKr are peft's LoHaConfig /
LoKrConfig (formats/peft_lycoris.py). One component holds one adapter type. Reading also accepts a single adapter
folder (adapter_config.json at the top), taken as the UNet unless told otherwise.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from quantune.errors import QuantuneError
from quantune.formats import peft_lycoris
from quantune.formats.diffusers_format import alpha_from_peft_config, peft_config_dict
from quantune.io import atomic_dir, load_safetensors, save_safetensors, write_json
from quantune.lora.adapter import AdapterModule, group_by_module
from quantune.lora.dora import DoraModule
from quantune.lora.layers import LoraModule
from quantune.lora.weights import COMPONENTS, LoraWeights

PREFIX = "base_model.model."
PEFT_MARKERS = ("*/adapter_config.json",)  # a folder save_peft wrote
_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_A(?:\.[^.]+)?\.weight$")
MAGNITUDE = "lora_magnitude_vector"


def _kind(mods: dict[str, AdapterModule], component: str) -> str:
    kinds = {m.kind if m.kind != "dora" else m.inner.kind for m in mods.values()}
    if len(kinds) > 1:
        raise QuantuneError(f"the {component} adapter mixes {', '.join(sorted(kinds))} modules: peft holds one type "
                            "per adapter; write kohya or quantune")  # fmt: skip
    kind = kinds.pop()
    if kind not in ("lora", *peft_lycoris.KIND_TO_PEFT):
        raise QuantuneError(f"peft has no {kind} adapter: write kohya or quantune")
    return kind


def _config(component: str, mods: dict[str, AdapterModule]) -> dict:
    kind = _kind(mods, component)
    if kind != "lora":
        if any(m.kind == "dora" for m in mods.values()):
            raise QuantuneError(f"peft's DoRA is LoRA's: a {kind} with DoRA has no peft form; write kohya")
        shapes = {p: tuple(m.update_shape()) for p, m in mods.items()}
        cfg = peft_lycoris.config(kind, mods, shapes)
    else:
        dora = {m.kind == "dora" for m in mods.values()}
        if len(dora) > 1:
            raise QuantuneError(f"the {component} adapter has DoRA on some modules only: peft's use_dora is per "
                                "adapter; write kohya or quantune")  # fmt: skip
        paths = list(mods)
        cfg = peft_config_dict(paths, [m.rank for m in mods.values()], [m.alpha for m in mods.values()])
        cfg.update({"peft_type": "LORA", "use_dora": dora.pop()})
    cfg.update({"task_type": None, "base_model_name_or_path": None, "inference_mode": True})
    return cfg


def save_peft(weights: LoraWeights, out_dir, overwrite: bool = False) -> list[Path]:
    """Write OUT/<component>/{adapter_config.json, adapter_model.safetensors} atomically; returns the folders."""
    groups: dict[str, dict[str, AdapterModule]] = {}
    for key, mod in weights.items():
        if getattr(mod, "soft", False):
            raise QuantuneError(f"{key} is a soft conv LoRA, which peft cannot load: train with conv_mode='hard'")
        component, _, path = key.partition(".")
        groups.setdefault(component, {})[path] = mod
    configs = {component: _config(component, mods) for component, mods in groups.items()}
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, PEFT_MARKERS, overwrite) as tmp:
        for component, mods in groups.items():
            sd = {f"{PREFIX}{path}.{n}": t for path, mod in mods.items() for n, t in mod.peft_tensors().items()}
            save_safetensors(sd, tmp / component / "adapter_model.safetensors", {"format": "pt"})
            write_json(configs[component], tmp / component / "adapter_config.json")
    return [out_dir / c for c in groups]


def is_peft_dir(path: Path) -> bool:
    return path.is_dir() and (
        (path / "adapter_config.json").is_file()
        or any((path / c / "adapter_config.json").is_file() for c in COMPONENTS)
    )


def load_peft(path, component: str = "unet") -> LoraWeights:
    """Read a peft adapter folder (or a folder of per-component adapter folders) into canonical weights."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        folders = {component: path}
    else:
        folders = {c: path / c for c in COMPONENTS if (path / c / "adapter_config.json").is_file()}
    if not folders:
        raise QuantuneError(f"{path} holds no adapter_config.json: not a peft adapter folder")
    weights: LoraWeights = {}
    for comp, folder in folders.items():
        try:
            cfg = json.loads((folder / "adapter_config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise QuantuneError(
                f"{folder}/adapter_config.json is not valid JSON ({e}): re-export the adapter"
            ) from None
        sd, _ = load_safetensors(folder / "adapter_model.safetensors")
        kind = cfg.get("peft_type", "LORA")
        if kind in peft_lycoris.TYPES:
            weights.update(peft_lycoris.read(cfg, _grouped(sd, folder), comp))
        elif kind == "LORA":
            weights.update(_read_lora(cfg, sd, folder, comp))
        else:
            raise QuantuneError(f"{folder} is a peft {kind} adapter: quantune reads LoRA (DoRA), LoHa and LoKr")
    return weights


def _grouped(sd: dict, folder: Path) -> dict[str, dict]:
    stray = next((k for k in sd if not k.startswith(PREFIX)), None)
    if stray is not None:
        raise QuantuneError(f"unexpected key {stray!r} in {folder}: not a peft adapter")
    grouped = group_by_module({k[len(PREFIX) :]: v for k, v in sd.items()})
    known = {f"{PREFIX}{m}.{s}" for m, parts in grouped.items() for s in parts}
    unknown = sorted(set(sd) - known)
    if unknown:
        raise QuantuneError(f"unexpected key {unknown[0]!r} in {folder}: not a LoHa / LoKr adapter quantune reads")
    return grouped


def _read_lora(cfg: dict, sd: dict, folder: Path, comp: str) -> LoraWeights:
    weights: LoraWeights = {}
    for name, down in sd.items():
        m = _KEY.match(name)
        if not m:
            if ".lora_B" not in name and not name.endswith(f".{MAGNITUDE}"):
                raise QuantuneError(f"unexpected key {name!r} in {folder}: not a LoRA adapter")
            continue
        p = m.group(1)
        up_name = name.replace(".lora_A", ".lora_B")
        if up_name not in sd:
            raise QuantuneError(f"{name} has no lora_B partner in {folder}: the adapter is incomplete")
        mod = LoraModule(down, sd[up_name], alpha_from_peft_config(cfg, p, down.shape[0]))
        vector = sd.get(f"{PREFIX}{p}.{MAGNITUDE}")
        if cfg.get("use_dora") and vector is None:
            raise QuantuneError(f"{folder}: use_dora is set but {p} has no {MAGNITUDE}: the adapter is incomplete")
        weights[f"{comp}.{p}"] = DoraModule.from_peft(mod, vector) if vector is not None else mod
    return weights
