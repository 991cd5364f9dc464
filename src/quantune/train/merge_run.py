"""Merge a quantized-base training run into an integer model folder (`quantune intlora|qlora merge`).

The run folder holds config.json (the resolved training config) and adapter_state.safetensors (every trainable
and calibrated tensor). The base is rebuilt exactly as in training (same seeds: same R*, same quantizers), the state
loaded, then: IntLoRA layers become their integer products / shifts (no PTQ); QLoRA layers are dequantized, the
LoRA delta added and the result re-quantized. The output is a diffusers pipeline folder whose UNet holds integers
(models/integer.py); `quantune.load_pipeline(DIR)` loads it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from quantune.errors import QuantuneError
from quantune.io import DIFFUSERS_FOLDER, check_output, load_safetensors
from quantune.models import load_pipeline
from quantune.models.integer import save_integer_pipeline
from quantune.train.config import config_from_dict
from quantune.train.quant_methods import STATE_FILE
from quantune.train.registry import METHODS

logger = logging.getLogger(__name__)
RUN_KINDS = {"intlora": ("intlora-mul", "intlora-shift"), "qlora": ("qlora",)}


def load_run(run_dir: str | Path, family: str):
    """(config, pipeline with the trained method applied, method) of a finished quantized run."""
    run_dir = Path(run_dir)
    cfg_path, state_path = run_dir / "config.json", run_dir / STATE_FILE
    missing = (
        f"{run_dir} is not a finished quantized training run (needs config.json and {STATE_FILE}): "
        "train one with `quantune train` and method = qlora / intlora-mul / intlora-shift"
    )
    if not cfg_path.is_file():
        raise QuantuneError(missing)
    try:
        cfg = config_from_dict(json.loads(cfg_path.read_text()))
    except json.JSONDecodeError as e:
        raise QuantuneError(f"{cfg_path} is not valid JSON ({e}): the run folder is damaged") from None
    if cfg.method not in RUN_KINDS[family]:
        other = next((f for f, methods in RUN_KINDS.items() if cfg.method in methods), None)
        fix = f"`quantune {other} merge`" if other else "`quantune lora merge` (a float LoRA needs no integer merge)"
        raise QuantuneError(f"{run_dir} was trained with method = {cfg.method!r}, not {family}: use {fix}")
    if not state_path.is_file():
        raise QuantuneError(missing)
    return cfg, *prepare_run(cfg, state_path)


def prepare_run(cfg, state_path: str | Path) -> tuple:
    """(pipeline with `cfg`'s training method applied, method), the trainable tensors of `state_path` loaded
    (a run's final state, or a checkpoint's trainable.safetensors)."""
    pipe = load_pipeline(cfg.model.pretrained, backend="torch")
    method = METHODS[cfg.method]()
    method.prepare(pipe, cfg)
    method.load_trainable_state(pipe, load_safetensors(state_path)[0])
    return pipe, method


def merge_run(run_dir: str | Path, out: str | Path, family: str, overwrite: bool = False) -> tuple[Path, int]:
    """Merge the run into an integer model at `out`; returns (out, number of merged layers). An existing `out` is
    refused (before the run loads) unless `overwrite`."""
    check_output(out, overwrite, DIFFUSERS_FOLDER)
    cfg, pipe, method = load_run(run_dir, family)
    n = method.merge(pipe, cfg)
    return save_integer_pipeline(pipe, out, overwrite=overwrite), n
