"""peft's adapter folder (`PeftModel.save_pretrained` / `PeftModel.from_pretrained`), converted by hand both ways.

A peft adapter is per model, so quantune writes one folder per pipeline component:
OUT/<component>/adapter_config.json + adapter_model.safetensors, with keys "base_model.model.<path>.lora_A.weight"
and a LoraConfig whose target_modules lists the adapted paths and whose rank_pattern / alpha_pattern reproduce
per-module ranks and alphas exactly. `PeftModel.from_pretrained(pipe.unet, "OUT/unet")` loads it. Reading also
accepts a single adapter folder (adapter_config.json at the top), taken as the UNet unless told otherwise.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from quantune.errors import QuantuneError
from quantune.formats.diffusers_format import alpha_from_peft_config, peft_config_dict
from quantune.io import atomic_dir, load_safetensors, save_safetensors, write_json
from quantune.lora.layers import LoraModule
from quantune.lora.weights import COMPONENTS, LoraWeights

PREFIX = "base_model.model."
PEFT_MARKERS = ("*/adapter_config.json",)  # a folder save_peft wrote
_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_A(?:\.[^.]+)?\.weight$")


def save_peft(weights: LoraWeights, out_dir, overwrite: bool = False) -> list[Path]:
    """Write OUT/<component>/{adapter_config.json, adapter_model.safetensors} atomically; returns the folders."""
    groups: dict[str, dict[str, LoraModule]] = {}
    for key, mod in weights.items():
        if getattr(mod, "soft", False):
            raise QuantuneError(f"{key} is a soft conv LoRA, which peft cannot load: train with conv_mode='hard'")
        component, _, path = key.partition(".")
        groups.setdefault(component, {})[path] = mod
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, PEFT_MARKERS, overwrite) as tmp:
        for component, mods in groups.items():
            paths = list(mods)
            cfg = peft_config_dict(paths, [m.rank for m in mods.values()], [m.alpha for m in mods.values()])
            cfg.update(
                {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True}
            )
            sd = {f"{PREFIX}{path}.{n}": t for path, mod in mods.items() for n, t in mod.peft_tensors().items()}
            save_safetensors(sd, tmp / component / "adapter_model.safetensors", {"format": "pt"})
            write_json(cfg, tmp / component / "adapter_config.json")
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
        if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora"):
            raise QuantuneError(
                f"{folder} is a {cfg.get('peft_type')} adapter (DoRA={cfg.get('use_dora')}): "
                "quantune reads plain LoRA adapters"
            )
        sd, _ = load_safetensors(folder / "adapter_model.safetensors")
        for name, down in sd.items():
            m = _KEY.match(name)
            if not m:
                if ".lora_B" not in name:
                    raise QuantuneError(f"unexpected key {name!r} in {folder}: not a plain LoRA adapter")
                continue
            p = m.group(1)
            up_name = name.replace(".lora_A", ".lora_B")
            if up_name not in sd:
                raise QuantuneError(f"{name} has no lora_B partner in {folder}: the adapter is incomplete")
            weights[f"{comp}.{p}"] = LoraModule(down, sd[up_name], alpha_from_peft_config(cfg, p, down.shape[0]))
    return weights
