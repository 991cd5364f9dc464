"""`quantize_pipeline`: post-training quantization of a pipeline's UNet by minmax, Q-Diffusion or EDA-DM, ending
in an integer UNet (QuantLinear / QuantConv2d + quantized attention) that `save_ptq_pipeline` writes.

Steps (spec/eda-dm.md "Pipeline"): FP trajectories -> calibration samples (TDAC for eda-dm, uniform otherwise) ->
shortcut splits -> wrap -> activation ranges (L2.4 per batch with EMA; min-max for minmax) -> reconstruct each
unit in forward order (not for minmax: round to nearest) -> hard rounding -> export integers.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from quantune.data.prompts import default_prompts
from quantune.errors import QuantuneError
from quantune.families import family_of
from quantune.models.integer import save_integer_pipeline
from quantune.ptq.act_lsq import LSQActQuantizer
from quantune.ptq.calib import collect_calibration
from quantune.ptq.config import PTQConfig
from quantune.ptq.reconstruct import capture_inputs, reconstruct_unit
from quantune.ptq.wrap import export_integer, recon_units, set_quant, shortcut_splits, wrap_for_ptq

logger = logging.getLogger(__name__)
REPORT_FILE = "quantune_ptq.json"


def _observe_activations(unet, calib, cfg: PTQConfig) -> None:
    quantizers = [m for m in unet.modules() if isinstance(m, LSQActQuantizer)]
    set_quant(unet, False)
    for q in quantizers:
        q.observing = True
    try:
        with torch.no_grad():
            for kwargs in calib.batches(cfg.batch_size):
                unet(**kwargs)
    finally:
        for q in quantizers:
            q.observing = False
    bad = [q for q in quantizers if not q.observed]
    if bad:
        raise QuantuneError(f"{len(bad)} activation quantizers never saw calibration data: the UNet skips layers")
    if not all(torch.isfinite(q.scale).all() and torch.isfinite(q.zero_point).all() for q in quantizers):
        raise QuantuneError("calibration produced NaN/inf activation ranges: check the model's FP outputs")


def quantize_pipeline(pipe, cfg: PTQConfig, prompts: list[str] | None = None, progress: bool = True) -> dict:
    """Quantize `pipe.unet` in place into an integer UNet; returns a report (counts, losses, time, sizes).
    On an error the UNet may be left partly wrapped: load the pipeline again before using it."""
    start = time.time()
    family = family_of(pipe)
    if family.denoiser != "unet":
        raise QuantuneError(f"{family.name}: quantune's PTQ quantizes diffusion UNets; transformers are not supported")
    unet = family.denoiser_of(pipe).eval().requires_grad_(False)
    fp32_bytes = sum(p.numel() * 4 for p in unet.parameters())
    if getattr(pipe, "text_encoder", None) is not None:
        prompts = prompts or default_prompts()
    calib, tdac = collect_calibration(pipe, cfg, prompts)
    first = calib.kwargs(slice(0, min(cfg.batch_size, calib.rows)))

    def run_once():
        with torch.no_grad():
            unet(**first)

    splits = shortcut_splits(unet, run_once)
    wrapped = wrap_for_ptq(unet, cfg, splits)
    _observe_activations(unet, calib, cfg)
    units = recon_units(unet, run_once)
    losses: dict[str, float] = {}
    if cfg.learns:
        generator = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # QDrop's masks draw from the global generator: seeded, the run repeats
        bar = tqdm(units, desc=f"{cfg.method} reconstruction", disable=not progress, unit="unit")
        done = []
        for name, unit in bar:
            set_quant(unet, False)
            fp_in = capture_inputs(unet, unit, calib.batches(cfg.batch_size))
            for d in done:
                set_quant(d, True)
            q_in = capture_inputs(unet, unit, calib.batches(cfg.batch_size))
            losses[name] = reconstruct_unit(unit, fp_in, q_in, cfg, generator)
            bar.set_postfix(unit=name, loss=f"{losses[name]:.4g}")
            done.append(unit)
    set_quant(unet, True)
    n = export_integer(unet)
    report = {
        "method": cfg.method,
        "wbits": cfg.wbits,
        "abits": cfg.abits,
        "attn_bits": cfg.attn_bits,
        "layers": n,
        "units": len(units),
        "shortcut_splits": len(splits),
        "calib_rows": calib.rows,
        "samples_per_step": calib.counts,
        "timesteps": calib.timesteps,
        "tdac_weights": [round(float(w), 4) for w in tdac],
        "losses": losses,
        "fp32_unet_bytes": fp32_bytes,
        "seconds": round(time.time() - start, 1),
        "config": {k: v for k, v in vars(cfg).items()},
    }
    logger.info("quantized %d layers (%d wrapped) in %.0f s", n, len(wrapped), report["seconds"])
    return report


def save_ptq_pipeline(pipe, out: str | Path, report: dict) -> Path:
    return save_integer_pipeline(pipe, out, extra={REPORT_FILE: report})
