"""Training methods on a quantized base: qlora, intlora-mul, intlora-shift (QLoRA, Dettmers et al. 2023, arXiv
2305.14314; IntLoRA, Guo et al. 2024, arXiv 2410.21759; docs/intlora.md).

- qlora: the targeted layers' frozen bases become integer layers (QuantLinear / QuantConv2d, real int8 or packed
  int4 storage, optional input fake-quant), a float LoRA on top. Merge = dequantize + add + re-quantize (the
  paper's QLoRA + PTQ baseline).
- intlora-mul / intlora-shift: every target becomes an IntLoraLayer (quant/intlora.py). Merge = the integer
  product / shift, exactly the training weight, no PTQ.
With quant.quantize_rest every other UNet Linear / Conv2d is an integer layer at quant.bits too (as the reference).
Activation quantizers are calibrated once, explicitly, on the first batch (`calibrate`), and checkpointed.
Bits and range search come from the `[quant]` section as the quantization core's WeightQuant / ActQuant
(`cfg.quant.weight`, `cfg.quant.act`): the same search for the weights and the activations of every layer.
The run's `adapter_state.safetensors` holds every trainable and calibrated tensor: `quantune intlora merge` and
`quantune qlora merge` rebuild the model from the base and it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantune.errors import QuantuneError
from quantune.families import family_of
from quantune.io import atomic_path
from quantune.lora.dora import restart_magnitude
from quantune.lora.inject import find_targets, lora_layers
from quantune.modules import set_module
from quantune.quant.config import QuantConfig
from quantune.quant.intlora import IntLoraConfig, IntLoraLayer
from quantune.quant.quantize import calibrate, quant_layers, quantize_
from quantune.quant.train_kernels import backward_dtype
from quantune.train.methods import (
    LoraMethod,
    TrainingMethod,
    freeze_all,
    merge_text_encoder_loras,
    text_encoder_lora,
)

logger = logging.getLogger(__name__)
STATE_FILE = "adapter_state.safetensors"


def _rest_config(cfg, targets: str | None = None) -> QuantConfig:
    return QuantConfig(cfg.quant.weight, cfg.quant.act, targets=targets)


class _QuantBase(TrainingMethod):
    backward = "auto"  # quant.backward_dtype, taken in prepare

    def trainable_state(self, pipe) -> dict[str, torch.Tensor]:
        state = super().trainable_state(pipe)
        family = family_of(pipe)
        for name, buf in family.denoiser_of(pipe).named_buffers():
            if ".act_quant." in name:  # calibrated once on the first batch: part of what a resume needs
                state[f"{family.denoiser}.{name}"] = buf.detach()
        return state

    def calibrate(self, pipe, run) -> None:
        calibrate(family_of(pipe).denoiser_of(pipe), run)

    def ready(self, pipe) -> None:
        """The frozen integer layers' kernels, from the calibrated (or restored) activation scales: their training
        forward runs on them (quant/train_kernels.py), the float path where they cannot; IntLoRA layers build
        their step's kernel (quant/intlora_train.py). Input gradients in `quant.backward_dtype`."""
        denoiser = family_of(pipe).denoiser_of(pipe)
        ways = Counter(layer.prepare_kernel() for layer in quant_layers(denoiser).values())
        dtype = backward_dtype(self.backward, next(denoiser.parameters()).device)
        for layer in [*quant_layers(denoiser).values(), *intlora_layers(denoiser).values()]:
            layer.backward_dtype = dtype
        for layer in intlora_layers(denoiser).values():
            layer.kernel_backend = "auto"
        logger.info("integer layers in training: %s; input gradients in %s", dict(ways), dtype)

    def _save_state(self, pipe, out_dir: Path, cfg) -> Path:
        meta = {"format": "quantune-quant-run", "method": cfg.method, "config": json.dumps(cfg.to_dict())}
        state = {k: v.contiguous().cpu() for k, v in self.trainable_state(pipe).items()}
        path = out_dir / STATE_FILE
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata=meta)
        return path

    def merge(self, pipe) -> int:
        raise NotImplementedError


class QLoraMethod(_QuantBase, LoraMethod):
    name = "qlora"

    def prepare(self, pipe, cfg) -> list[dict]:
        self.backward = cfg.quant.backward_dtype
        denoiser = family_of(pipe).denoiser_of(pipe)
        fresh = not lora_layers(denoiser)  # else a `lora embed` folder's adapter, trained further
        groups = LoraMethod.prepare(self, pipe, cfg)  # LoRA on the float layers (text encoder stays float)
        q = cfg.quant
        qc = _rest_config(cfg) if q.quantize_rest else _rest_config(cfg, targets=r".*\.base_layer")
        n = len(quantize_(denoiser, qc))
        if fresh:  # QDoRA starts from the integer model: m = ||W_q||, not the float weight's norm
            for layer in lora_layers(denoiser).values():
                restart_magnitude(layer)
        logger.info("qlora: %d denoiser layers in %d-bit integers under float LoRA", n, q.bits)
        return groups

    def export(self, pipe, out_dir: Path, cfg) -> list[Path]:
        return [self._save_state(pipe, out_dir, cfg), *LoraMethod.export(self, pipe, out_dir, cfg)]

    @torch.no_grad()
    def merge(self, pipe, cfg=None) -> int:
        """Dequantize + add the LoRA delta + re-quantize (same bits and search) every adapted base."""
        n = requantize_layers(family_of(pipe).denoiser_of(pipe), cfg.quant.search if cfg is not None else "l2.4")
        merge_text_encoder_loras(pipe)  # the text encoders are float: a plain LoRA merge
        logger.info("qlora merge: %d layers dequantized, added to and re-quantized", n)
        return n


@torch.no_grad()
def requantize_layers(denoiser, search: str = "l2.4", per_channel: bool = True) -> int:
    """QLoRA's merge of every LoRA layer on an integer base in `denoiser` (in place); returns how many."""
    layers = lora_layers(denoiser)
    for name, layer in layers.items():
        set_module(denoiser, name, requantize(layer, search, per_channel))
    return len(layers)


def requantize(layer, search: str = "l2.4", per_channel: bool = True):
    """QLoRA + PTQ for one LoraLayer on an integer base: dequantize, add the delta, quantize again (same bits; one
    scale per output row and weight grid, or per tensor)."""
    base = layer.base_layer
    return base.with_weight(base.dequantize() + layer.weight_update() * layer.multiplier, search, per_channel)


class IntLoraMethod(_QuantBase):
    mode = "mul"

    def prepare(self, pipe, cfg) -> list[dict]:
        self.backward = cfg.quant.backward_dtype
        freeze_all(pipe)
        denoiser = family_of(pipe).denoiser_of(pipe)
        lc = cfg.lora.denoiser_config(family_of(pipe), seed=cfg.train.seed)
        q = cfg.quant
        if lc.conv_mode == "soft":
            raise QuantuneError("IntLoRA merges into the base: lora.conv_mode = 'soft' cannot be used, set 'hard'")
        if lc.type != "lora" or lc.dora:
            kind = f"{lc.type}{' + DoRA' if lc.dora else ''}"
            raise QuantuneError(f"IntLoRA's integer merge is defined for LoRA's B A, not for {kind}: set lora.type = "
                                "'lora' (or train qlora)")  # fmt: skip
        generator = torch.Generator().manual_seed(cfg.train.seed)
        shared = IntLoraConfig(mode=self.mode, weight=q.weight, lora_bits=q.lora_bits, act=q.act,
                               vmc_alpha=q.vmc_alpha, seed=cfg.train.seed, zero_fix=q.zero_fix,
                               shift_span=q.shift_span, cache_aux=q.cache_aux)  # fmt: skip
        for name in find_targets(denoiser, lc):
            base = denoiser.get_submodule(name)
            config = dataclasses.replace(shared, r=lc.rank_for(name), alpha=lc.alpha_for(name))
            layer = IntLoraLayer(base, name, config, generator)
            set_module(denoiser, name, layer.to(base.weight.device))
        if q.quantize_rest:
            quantize_(denoiser, _rest_config(cfg))
        te_groups = text_encoder_lora(pipe, cfg) if cfg.lora.text_encoder else []
        layers = intlora_layers(denoiser)
        dropped = sum(m.zero_fraction() * m.lora_A.shape[1] * m.lora_B.shape[0] for m in layers.values())
        total = sum(m.lora_A.shape[1] * m.lora_B.shape[0] for m in layers.values())
        logger.info(
            "intlora-%s: %d layers, W%d, zero-drop %.2f%% of adapted weights (zero_fix=%s)",
            self.mode,
            len(layers),
            q.bits,
            100 * dropped / max(total, 1),
            q.zero_fix,
        )
        params = [p for m in layers.values() for p in (m.lora_A, m.lora_B)]
        return [{"params": params, "lr": cfg.optim.lr}, *te_groups]

    def export(self, pipe, out_dir: Path, cfg) -> list[Path]:
        state = self._save_state(pipe, out_dir, cfg)
        integer = {}
        layers = intlora_layers(family_of(pipe).denoiser_of(pipe))
        for name, layer in layers.items():
            integer.update({f"{name}.{k}": v.contiguous().cpu() for k, v in layer.integer_adapter().items()})
        path = out_dir / "intlora_int.safetensors"
        with atomic_path(path) as tmp:
            save_file(integer, str(tmp), metadata={"format": "quantune-intlora-int", "method": cfg.method})
        float_bytes = sum(p.numel() * 4 for m in layers.values() for p in (m.lora_A, m.lora_B))
        int_bytes = sum(v.numel() * v.element_size() for v in integer.values())
        logger.info(
            "IntLoRA adapter: float A, B %.2f MB; integer adaptation term %.2f MB",
            float_bytes / 2**20,
            int_bytes / 2**20,
        )
        return [state, path]

    @torch.no_grad()
    def merge(self, pipe, cfg=None) -> int:
        denoiser = family_of(pipe).denoiser_of(pipe)
        layers = intlora_layers(denoiser)
        stored = Counter()
        for name, layer in layers.items():
            merged = layer.merge()
            stored[str(merged.qweight.dtype).removeprefix("torch.")] += 1
            set_module(denoiser, name, merged)
        merge_text_encoder_loras(pipe)
        logger.info("intlora-%s merge: %d layers now integer (stored as %s)", self.mode, len(layers),
                    ", ".join(f"{d} x {n}" for d, n in sorted(stored.items())))  # fmt: skip
        return len(layers)


class IntLoraShiftMethod(IntLoraMethod):
    mode = "shift"


def intlora_layers(model) -> dict[str, IntLoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, IntLoraLayer)}


QUANT_METHODS = {"qlora": QLoraMethod, "intlora-mul": IntLoraMethod, "intlora-shift": IntLoraShiftMethod}
