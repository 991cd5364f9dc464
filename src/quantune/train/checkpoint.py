"""Training checkpoints: everything a run needs to resume bit-exactly, written atomically, safetensors + JSON only.

A checkpoint folder `checkpoints/step-000100/` holds:
  trainable.safetensors   the method's trainable tensors (LoRA factors, or the full UNet)
  optimizer.safetensors   the optimizer's per-parameter state, flattened ("state.<i>.<name>")
  ema.safetensors         the EMA shadow parameters (when EMA is on)
  state.json              step, data position, optimizer param_groups, LR-scheduler state
No RNG state is needed: every random draw of step s comes from generators seeded with (seed, s, rank).
The folder is built under a temporary name and renamed, so a run killed mid-write leaves the previous checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from quantune.errors import QuantuneError
from quantune.io import atomic_dir, load_safetensors, save_safetensors

_NAME = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    step: int  # optimizer steps done
    position: int  # samples consumed from the data stream (global, all ranks)


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(root: Path, ts: TrainState, trainable, optimizer, lr_scheduler, ema=None, keep: int = 2) -> Path:
    """Write checkpoints/step-XXXXXX atomically and keep only the newest `keep`."""
    folder = Path(root) / f"step-{ts.step:06d}"
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    state = {
        "step": ts.step,
        "position": ts.position,
        "optimizer": opt_meta,
        "lr_scheduler": lr_scheduler.state_dict(),
        "ema_step": ema.optimization_step if ema is not None else None,
    }
    with atomic_dir(folder, markers=("state.json",), overwrite=True) as tmp:
        save_safetensors(dict(trainable), tmp / "trainable.safetensors")
        save_safetensors(opt_tensors, tmp / "optimizer.safetensors")
        if ema is not None:
            save_safetensors({str(i): p for i, p in enumerate(ema.shadow_params)}, tmp / "ema.safetensors")
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def list_checkpoints(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def find_checkpoint(root: Path, which: str) -> Path:
    """`latest` or a step-XXXXXX folder name / path."""
    if which == "latest":
        found = list_checkpoints(root)
        if not found:
            raise QuantuneError(
                f"--resume latest: no checkpoint under {root} (set log.checkpoint_every to write some)"
            )
        return found[-1]
    path = Path(which) if Path(which).is_dir() else Path(root) / which
    if not (path / "state.json").is_file():
        raise QuantuneError(f"--resume {which}: {path} is not a checkpoint folder (no state.json)")
    return path


def load_checkpoint(folder: Path, optimizer, lr_scheduler, ema=None) -> tuple[TrainState, dict]:
    """Restore optimizer, scheduler (and EMA) in place; return the state and the trainable tensors."""
    state = json.loads((folder / "state.json").read_text())
    trainable, _ = load_safetensors(folder / "trainable.safetensors")
    opt_tensors, _ = load_safetensors(folder / "optimizer.safetensors")
    optimizer.load_state_dict(_unflatten_optimizer(opt_tensors, state["optimizer"]))
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if ema is not None and (folder / "ema.safetensors").is_file():
        shadow, _ = load_safetensors(folder / "ema.safetensors")
        for i, p in enumerate(ema.shadow_params):
            p.data.copy_(shadow[str(i)])
        ema.optimization_step = state.get("ema_step") or 0
    return TrainState(step=state["step"], position=state["position"]), trainable
