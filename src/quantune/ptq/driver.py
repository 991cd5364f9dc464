"""The generic PTQ driver: `quantize_model(model, batches, cfg)` quantizes a denoiser from given input batches with
any registered method (ptq/methods/), unit by unit, in GPTQ's shape: a per-unit calibrator (the method's
`reconstruct`) under one sequential loop (EDA-DM, arXiv 2401.04585; Q-Diffusion, arXiv 2302.04304; BRECQ, arXiv
2102.05426; docs/quantization.md).

Steps: shortcut splits (one forward) -> the method wraps the model -> activation ranges (the quantizers'
observation protocol, quant/act.py, over every batch, the model in float) -> reconstruction units in forward order
(one forward) -> when the method learns, for each unit: its inputs in the float model (X_fp) and in the model with
every earlier unit quantized (X_q), then the method's reconstruction -> hard rounding -> the method's export to
integer layers. `batches` are the model's forward keyword arguments; each is moved to the model's device when used,
so they may stay on the CPU.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from quantune.errors import QuantuneError
from quantune.families import family_of_model
from quantune.ptq.config import PTQConfig
from quantune.ptq.methods import PTQMethod, method_for
from quantune.ptq.reconstruct import capture_inputs
from quantune.ptq.smooth import smoothable, smoothing_factors
from quantune.ptq.wrap import recon_units, set_quant, shortcut_splits
from quantune.quant.act import ActQuantBase, observe_activations

logger = logging.getLogger(__name__)


class Batches:
    """The calibration batches (forward keyword arguments), each moved to `device` as it is handed out."""

    def __init__(self, batches: list[dict], device: torch.device) -> None:
        if not batches or not all(isinstance(b, dict) for b in batches):
            raise QuantuneError("quantize_model needs a non-empty list of batches, each a dict of forward arguments")
        self.batches, self.device = list(batches), device

    def _moved(self, batch: dict) -> dict:
        return pytree.tree_map(lambda x: x.to(self.device) if isinstance(x, torch.Tensor) else x, batch)

    def first(self) -> dict:
        return self._moved(self.batches[0])

    def __iter__(self):
        return (self._moved(b) for b in self.batches)


def _device(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    tensor = tensor if tensor is not None else next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def observe_ranges(model: nn.Module, data: Batches) -> int:
    """Fix every activation quantizer's range on the batches, the model running in float; returns their count."""
    quantizers = {n: m for n, m in model.named_modules() if isinstance(m, ActQuantBase)}
    set_quant(model, False)

    def run() -> None:
        for kwargs in data:
            model(**kwargs)

    unseen = observe_activations(quantizers, run)
    if unseen:
        raise QuantuneError(f"{len(unseen)} activation quantizers never saw calibration data: the UNet skips layers")
    return len(quantizers)


def reconstruct_units(model, units, data: Batches, method: PTQMethod, cfg: PTQConfig, progress: bool) -> dict:
    """The sequential driver: each unit in forward order, reconstructed by the method from its X_fp and X_q;
    returns {unit name: last loss}."""
    losses: dict[str, float] = {}
    generator = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # QDrop's masks draw from the global generator: seeded, the run repeats
    bar = tqdm(units, desc=f"{cfg.method} reconstruction", disable=not progress, unit="unit")
    done = []
    for name, unit in bar:
        set_quant(model, False)
        fp_in = capture_inputs(model, unit, iter(data))
        for d in done:
            set_quant(d, True)
        q_in = capture_inputs(model, unit, iter(data))
        losses[name] = method.reconstruct(unit, fp_in, q_in, generator)
        bar.set_postfix(unit=name, loss=f"{losses[name]:.4g}")
        done.append(unit)
    return losses


def quantize_model(
    model: nn.Module, batches: list[dict], cfg: PTQConfig, progress: bool = True, unit_types: tuple | None = None
) -> dict:
    """Quantize `model` (a diffusers UNet or transformer of a supported family) in place into an integer model from
    `batches` (its forward keyword arguments, e.g. {"sample", "timestep", "encoder_hidden_states"}) with `cfg`'s
    method; `unit_types`: the reconstruction units' module classes (default: the model's family's); returns a report
    (method, bits, layers, units, shortcut splits, losses per unit, seconds). On an error the model may be left
    partly wrapped: load it again before using it."""
    start = time.time()
    family = family_of_model(model)
    cfg = cfg.for_family(family)  # lists left unset: the model family's (quantize_pipeline has set them already)
    unit_types = unit_types or family.ptq_unit_types()
    method = method_for(cfg)
    model.eval().requires_grad_(False)
    data = Batches(batches, _device(model))

    def run_once() -> None:
        with torch.no_grad():
            model(**data.first())

    splits = shortcut_splits(model, run_once)
    smooth = {}  # SmoothQuant's s per layer (ptq/smooth.py), from the float model over every batch
    if cfg.smooth is not None:
        smooth = smoothing_factors(model, smoothable(model, cfg, splits), data, cfg.smooth)
    wrapped = method.wrap(model, splits, smooth)
    observe_ranges(model, data)
    units = recon_units(model, run_once, unit_types)
    losses = reconstruct_units(model, units, data, method, cfg, progress) if method.learns(cfg) else {}
    set_quant(model, True)
    n = method.export(model)
    seconds = round(time.time() - start, 1)
    logger.info("quantized %d layers (%d wrapped) in %.0f s", n, len(wrapped), seconds)
    return {"method": cfg.method, "wbits": cfg.wbits, "abits": cfg.abits, "attn_bits": cfg.attn_bits, "layers": n,
            "units": len(units), "shortcut_splits": len(splits), "smoothed": len(smooth), "losses": losses,
            "seconds": seconds}  # fmt: skip
