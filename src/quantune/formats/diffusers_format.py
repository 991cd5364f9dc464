"""diffusers' LoRA file (`pipe.save_lora_weights` / `pipe.load_lora_weights`), converted by hand both ways.

Writing: one safetensors file with peft naming, "unet.<path>.lora_A.weight" / ".lora_B.weight" and
"text_encoder.<path>...", plus diffusers' `lora_adapter_metadata` (a JSON of peft LoraConfig fields per component,
keys "<component>.r", "<component>.lora_alpha", "<component>.rank_pattern", ...), which diffusers >= 0.34 uses to
rebuild the exact alphas; with it absent diffusers assumes alpha = r. DoRA: "...lora_magnitude_vector" beside a
LoRA's factors and use_dora in the metadata (diffusers' loader gives it to peft). Reading accepts both namings
(lora_A/lora_B and the older lora.down/lora.up, "lora_linear_layer"), with or without that metadata.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import torch

from quantune.errors import QuantuneError
from quantune.lora.dora import DoraModule
from quantune.lora.layers import LoraModule
from quantune.lora.weights import LoraWeights
from quantune.targets import pattern_value

METADATA_KEY = "lora_adapter_metadata"
_DOWN = re.compile(r"^(.+?)\.(?:lora_A|lora\.down|lora_linear_layer\.down|lora_down)\.weight$")
_UP_NAMES = ("lora_B", "lora.up", "lora_linear_layer.up", "lora_up")


def peft_config_dict(paths: list[str], ranks: list[int], alphas: list[float]) -> dict:
    """peft LoraConfig fields that reproduce per-module ranks and alphas exactly (patterns only where needed)."""
    r = Counter(ranks).most_common(1)[0][0]
    alpha = Counter(alphas).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(paths),
        "rank_pattern": {re.escape(p): k for p, k in zip(paths, ranks) if k != r},
        "alpha_pattern": {re.escape(p): a for p, a in zip(paths, alphas) if a != alpha},
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
    }


def alpha_from_peft_config(cfg: dict, path: str, rank: int) -> float:
    """The canonical alpha (scale * r) of one module under a peft LoraConfig dict."""
    alpha = float(pattern_value(cfg.get("alpha_pattern") or {}, path, cfg.get("lora_alpha", rank)))
    return alpha * rank**0.5 if cfg.get("use_rslora") else alpha


def to_diffusers(weights: LoraWeights) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    sd: dict[str, torch.Tensor] = {}
    by_component: dict[str, list[tuple[str, LoraModule]]] = {}
    dora: dict[str, set[bool]] = {}
    for key, mod in weights.items():
        if getattr(mod, "soft", False):
            raise QuantuneError(f"{key} is a soft conv LoRA, which diffusers cannot load: train with conv_mode='hard'")
        if mod.kind not in ("lora", "dora"):
            raise QuantuneError(f"{key} is a {mod.kind} adapter: diffusers loads LoRA and DoRA only; write kohya "
                                "(ComfyUI, A1111 and LyCORIS read it), peft or quantune")  # fmt: skip
        dora.setdefault(key.partition(".")[0], set()).add(mod.kind == "dora")
        sd.update({f"{key}.{name}": t for name, t in mod.peft_tensors().items()})
        component, _, path = key.partition(".")
        by_component.setdefault(component, []).append((path, mod))
    meta = {}
    for component, items in by_component.items():
        cfg = peft_config_dict([p for p, _ in items], [m.rank for _, m in items], [m.alpha for _, m in items])
        if len(dora[component]) > 1:
            raise QuantuneError(f"the {component} LoRA has DoRA on some modules only: diffusers' use_dora is per "
                                "component; write kohya or quantune")  # fmt: skip
        cfg["use_dora"] = dora[component].pop()
        meta.update({f"{component}.{k}": v for k, v in cfg.items()})
    return sd, {"format": "pt", METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)}


def from_diffusers(sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> LoraWeights:
    packed = json.loads(metadata[METADATA_KEY]) if metadata.get(METADATA_KEY) else {}
    configs: dict[str, dict] = {}
    for k, v in packed.items():
        component, _, field = k.partition(".")
        configs.setdefault(component, {})[field] = v
    weights: LoraWeights = {}
    used = set()
    for name, down in sd.items():
        m = _DOWN.match(name)
        if not m:
            continue
        key = m.group(1)
        up_name = next((f"{key}.{u}.weight" for u in _UP_NAMES if f"{key}.{u}.weight" in sd), None)
        if up_name is None:
            raise QuantuneError(f"{name} has no matching up/lora_B weight: the file is incomplete")
        # diffusers' old attention-processor naming: "attn1.processor.to_out_lora" -> "attn1.to_out.0"
        key = key.replace(".processor.", ".").replace("to_out_lora", "to_out.0").replace("_lora", "")
        component, _, path = key.partition(".")
        cfg = configs.get(component)
        alpha = alpha_from_peft_config(cfg, path, down.shape[0]) if cfg else float(down.shape[0])
        alpha_key = f"{m.group(1)}.alpha"
        if alpha_key in sd:  # some exporters put kohya-style alphas beside diffusers keys
            alpha = float(sd[alpha_key])
            used.add(alpha_key)
        weights[key] = LoraModule(down=down, up=sd[up_name], alpha=alpha)
        used.update((name, up_name))
        magnitude = f"{m.group(1)}.lora_magnitude_vector"
        if magnitude in sd:  # DoRA (peft's use_dora)
            weights[key] = DoraModule.from_peft(weights[key], sd[magnitude])
            used.add(magnitude)
    unknown = [k for k in sd if k not in used]
    if unknown:
        raise QuantuneError(f"unknown keys in a diffusers LoRA file, e.g. {unknown[0]!r}: not a LoRA this reads")
    return weights
