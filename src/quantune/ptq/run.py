"""`quantize_pipeline`: post-training quantization of a pipeline's UNet by a registered method (minmax, Q-Diffusion,
EDA-DM: ptq/methods/), ending in an integer UNet (QuantLinear / QuantConv2d + quantized attention) that
`save_ptq_pipeline` writes.

Steps (EDA-DM, arXiv 2401.04585; docs/quantization.md): FP trajectories -> calibration samples per step (the
method's choice: TDAC for eda-dm, uniform otherwise; ptq/calib.py) -> batches of UNet arguments -> the generic
driver, `quantize_model` (ptq/driver.py): shortcut splits, wrap, activation ranges, per-unit reconstruction in
forward order, hard rounding, export to integers.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from quantune.data.prompts import default_prompts
from quantune.families import family_of
from quantune.models.integer import save_integer_pipeline
from quantune.ptq.calib import collect_calibration
from quantune.ptq.config import PTQConfig
from quantune.ptq.driver import quantize_model

logger = logging.getLogger(__name__)
REPORT_FILE = "quantune_ptq.json"


def quantize_pipeline(pipe, cfg: PTQConfig, prompts: list[str] | None = None, progress: bool = True) -> dict:
    """Quantize `pipe.unet` in place into an integer UNet; returns a report (counts, losses, time, sizes).
    On an error the UNet may be left partly wrapped: load the pipeline again before using it."""
    start = time.time()
    family = family_of(pipe)
    cfg = cfg.for_family(family)
    unit_types = family.ptq_unit_types()  # refuses a family PTQ cannot reconstruct yet, before any work
    unet = family.denoiser_of(pipe).eval().requires_grad_(False)
    fp32_bytes = sum(t.numel() * 4 for t in unet.state_dict().values())  # what a float folder holds: + buffers
    if family.text_encoders_of(pipe):
        prompts = prompts or default_prompts()
    calib, tdac = collect_calibration(pipe, cfg, prompts)
    batches = list(calib.batches(cfg.batch_size, on_device=False))
    done = quantize_model(unet, batches, cfg, progress, unit_types)
    return {
        **{
            k: done[k]
            for k in ("method", "wbits", "abits", "attn_bits", "layers", "units", "shortcut_splits", "smoothed")
        },
        "calib_rows": calib.rows,
        "samples_per_step": calib.counts,
        "timesteps": calib.timesteps,
        "tdac_weights": [round(float(w), 4) for w in tdac],
        "losses": done["losses"],
        "fp32_unet_bytes": fp32_bytes,
        "seconds": round(time.time() - start, 1),
        "config": cfg.to_dict(),
    }


def save_ptq_pipeline(pipe, out: str | Path, report: dict, overwrite: bool = False) -> Path:
    return save_integer_pipeline(pipe, out, extra={REPORT_FILE: report}, overwrite=overwrite)
