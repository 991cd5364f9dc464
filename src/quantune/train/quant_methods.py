"""Training methods on a quantized base: qlora, intlora-mul, intlora-shift (../shared/spec/intlora.md).

- qlora: the targeted layers' frozen bases become integer layers (QuantLinear / QuantConv2d, real int8 or packed
  int4 storage, optional input fake-quant), a float LoRA on top. Merge = dequantize + add + re-quantize (the
  paper's QLoRA + PTQ baseline).
- intlora-mul / intlora-shift: every target becomes an IntLoraLayer (quant/intlora.py). Merge = the integer
  product / shift, exactly the training weight, no PTQ.
With quant.quantize_rest every other UNet Linear / Conv2d is an integer layer at quant.bits too (as the reference).
Activation quantizers are calibrated once, explicitly, on the first batch (`calibrate`), and checkpointed.
The run's `adapter_state.safetensors` holds every trainable and calibrated tensor: `quantune intlora merge` and
`quantune qlora merge` rebuild the model from the base and it.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import torch

from quantune.errors import QuantuneError
from quantune.lora.inject import add_lora, find_targets, lora_parameters
from quantune.modules import set_module
from quantune.quant.config import QuantConfig
from quantune.quant.intlora import IntLoraLayer
from quantune.quant.quantize import calibrate, quantize_
from quantune.train.methods import LoraMethod, TrainingMethod

logger = logging.getLogger(__name__)
STATE_FILE = "adapter_state.safetensors"


def _rest_config(cfg) -> QuantConfig:
    q = cfg.quant
    return QuantConfig(bits=q.bits, act_bits=q.act_bits or None, search=q.search)


class _QuantBase(TrainingMethod):
    def trainable_state(self, pipe) -> dict[str, torch.Tensor]:
        state = super().trainable_state(pipe)
        for name, buf in pipe.unet.named_buffers():
            if ".act_quant." in name:  # calibrated once on the first batch: part of what a resume needs
                state[f"unet.{name}"] = buf.detach()
        return state

    def calibrate(self, pipe, run) -> None:
        calibrate(pipe.unet, run)

    def _save_state(self, pipe, out_dir: Path, cfg) -> Path:
        from safetensors.torch import save_file

        from quantune.io import atomic_path

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
        groups = LoraMethod.prepare(self, pipe, cfg)  # LoRA on the float layers (text encoder stays float)
        q = cfg.quant
        qc = (
            _rest_config(cfg)
            if q.quantize_rest
            else QuantConfig(bits=q.bits, act_bits=q.act_bits or None, search=q.search, targets=r".*\.base_layer")
        )
        n = len(quantize_(pipe.unet, qc))
        logger.info("qlora: %d UNet layers in %d-bit integers under float LoRA", n, q.bits)
        return groups

    def export(self, pipe, out_dir: Path, cfg) -> list[Path]:
        return [self._save_state(pipe, out_dir, cfg), *LoraMethod.export(self, pipe, out_dir, cfg)]

    @torch.no_grad()
    def merge(self, pipe, cfg=None) -> int:
        """Dequantize + add the LoRA delta + re-quantize (same bits and search) every adapted base."""
        from quantune.lora.inject import lora_layers

        search = cfg.quant.search if cfg is not None else "l2.4"
        layers = lora_layers(pipe.unet)
        for name, layer in layers.items():
            set_module(pipe.unet, name, requantize(layer, search))
        if pipe.text_encoder is not None and lora_layers(pipe.text_encoder):
            from quantune.lora.inject import remove_lora

            remove_lora(pipe.text_encoder, merge=True)  # the text encoder is float: a plain LoRA merge
        logger.info("qlora merge: %d layers dequantized, added to and re-quantized", len(layers))
        return len(layers)


def requantize(layer, search: str = "l2.4"):
    """QLoRA + PTQ for one LoraLayer on an integer base: dequantize, add the delta, quantize again (same bits)."""
    from quantune.quant.layers import from_float

    base = layer.base_layer
    w = base.dequantize() + layer.get_delta_weight() * layer.multiplier
    merged = from_float(base, base.bits, search=search, weight=w)
    merged.act_quant = base.act_quant
    return merged


class IntLoraMethod(_QuantBase):
    mode = "mul"

    def prepare(self, pipe, cfg) -> list[dict]:
        for model in (pipe.unet, pipe.text_encoder, pipe.vae):
            if model is not None:
                model.requires_grad_(False)
        lc, q = cfg.lora.unet_config(seed=cfg.train.seed), cfg.quant
        if lc.conv_mode == "soft":
            raise QuantuneError("IntLoRA merges into the base: lora.conv_mode = 'soft' cannot be used, set 'hard'")
        generator = torch.Generator().manual_seed(cfg.train.seed)
        names = find_targets(pipe.unet, lc)
        for name in names:
            base = pipe.unet.get_submodule(name)
            layer = IntLoraLayer(
                base,
                name,
                mode=self.mode,
                r=lc.rank_for(name),
                alpha=lc.alpha_for(name),
                bits=q.bits,
                lora_bits=q.lora_bits or None,
                vmc_alpha=q.vmc_alpha,
                seed=cfg.train.seed,
                zero_fix=q.zero_fix,
                shift_span=q.shift_span,
                act_bits=q.act_bits or None,
                search=q.search,
                cache_aux=q.cache_aux,
                generator=generator,
            )
            set_module(pipe.unet, name, layer.to(base.weight.device))
        if q.quantize_rest:
            quantize_(pipe.unet, _rest_config(cfg))
        if cfg.lora.text_encoder:
            add_lora(pipe.text_encoder, cfg.lora.text_encoder_config(seed=cfg.train.seed + 1))
        layers = intlora_layers(pipe.unet)
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
        groups = [{"params": params, "lr": cfg.optim.lr}]
        if cfg.lora.text_encoder:
            te = lora_parameters(pipe.text_encoder)
            groups.append({"params": te, "lr": cfg.optim.text_encoder_lr or cfg.optim.lr})
        return groups

    def export(self, pipe, out_dir: Path, cfg) -> list[Path]:
        from safetensors.torch import save_file

        from quantune.io import atomic_path

        state = self._save_state(pipe, out_dir, cfg)
        integer = {}
        for name, layer in intlora_layers(pipe.unet).items():
            integer.update({f"{name}.{k}": v.contiguous().cpu() for k, v in layer.integer_adapter().items()})
        path = out_dir / "intlora_int.safetensors"
        with atomic_path(path) as tmp:
            save_file(integer, str(tmp), metadata={"format": "quantune-intlora-int", "method": cfg.method})
        float_bytes = sum(p.numel() * 4 for m in intlora_layers(pipe.unet).values() for p in (m.lora_A, m.lora_B))
        int_bytes = sum(v.numel() * v.element_size() for v in integer.values())
        logger.info(
            "IntLoRA adapter: float A, B %.2f MB; integer adaptation term %.2f MB",
            float_bytes / 2**20,
            int_bytes / 2**20,
        )
        return [state, path]

    @torch.no_grad()
    def merge(self, pipe, cfg=None) -> int:
        layers = intlora_layers(pipe.unet)
        stored = Counter()
        for name, layer in layers.items():
            merged = layer.merge()
            stored[str(merged.qweight.dtype).removeprefix("torch.")] += 1
            set_module(pipe.unet, name, merged)
        if pipe.text_encoder is not None:
            from quantune.lora.inject import lora_layers, remove_lora

            if lora_layers(pipe.text_encoder):
                remove_lora(pipe.text_encoder, merge=True)
        logger.info("intlora-%s merge: %d layers now integer (stored as %s)", self.mode, len(layers),
                    ", ".join(f"{d} x {n}" for d, n in sorted(stored.items())))  # fmt: skip
        return len(layers)


class IntLoraShiftMethod(IntLoraMethod):
    mode = "shift"


def intlora_layers(model) -> dict[str, IntLoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, IntLoraLayer)}


QUANT_METHODS = {"qlora": QLoraMethod, "intlora-mul": IntLoraMethod, "intlora-shift": IntLoraShiftMethod}
