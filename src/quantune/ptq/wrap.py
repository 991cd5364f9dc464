"""The fake-quantized UNet that PTQ calibrates and reconstructs, its reconstruction units, and the export to the
integer model (EDA-DM, arXiv 2401.04585, and Q-Diffusion, arXiv 2302.04304: the wrapped layers, the layers kept at
higher precision, the shortcut split, the reconstruction units; docs/quantization.md).

- Every nn.Linear / nn.Conv2d becomes a PTQLayer: the float layer, an AdaRound weight quantizer (per output
  channel) and an LSQ activation quantizer (per tensor) on its input, as PTQConfig.weight_for / act_for say
  (the quantization core's WeightQuant / ActQuant, quant/config.py); `keep_8bit` layers get 8-bit weights,
  `act_fp` layers no input quantizer, `keep_fp` layers stay float. The shortcut conv of an up-block ResNet, whose
  input is concat(h, skip), gets a split input quantizer (one per part) and, with `split_weight` (the reference
  code's QuantModule: weight_quantizer / weight_quantizer_0), a weight grid per part too: a scale and zero point
  per output channel for the input channels of h and another for those of skip.
- Every diffusers Attention gets a QuantAttnProcessor with LSQ quantizers on q, k, v and the softmax output.
- Units, in the order the forward calls them: ResnetBlock2D, BasicTransformerBlock and standalone Attention blocks
  are reconstructed as blocks; every PTQLayer outside them (conv_in, time embedding, proj_in/out, down/upsamplers,
  conv_out) layer by layer.
- A leaf module with parameters that quantune cannot quantize or keep float (e.g. Conv1d, ConvTranspose2d) is an
  error that names it, never skipped silently.
"""

from __future__ import annotations

import inspect
import logging

import torch
import torch.nn.functional as F
from diffusers.models.normalization import RMSNorm
from torch import nn

from quantune.errors import QuantuneError
from quantune.modules import set_module
from quantune.ptq.act_lsq import LSQActQuantizer
from quantune.ptq.adaround import AdaRoundQuantizer, NearestQuantizer
from quantune.ptq.config import PTQConfig
from quantune.quant.attention import QuantAttnProcessor, attentions, quantize_attention, unsupported_reason
from quantune.quant.config import ActQuant, WeightQuant
from quantune.quant.layers import from_codes
from quantune.quant.primitives import split_groups
from quantune.targets import listed

logger = logging.getLogger(__name__)
FLOAT_LEAVES = (nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, nn.Embedding, RMSNorm)  # RMSNorm: diffusers'
# parameters that modulate activations (added / multiplied elementwise), no product's weight: kept in float
FLOAT_TABLES = ("scale_shift_table",)  # PixArt's ada_norm_single modulation (model and every block)


class PTQLayer(nn.Module):
    """A float nn.Linear / nn.Conv2d with an AdaRound weight quantizer (`weight`) and, unless `act` is None, an LSQ
    quantizer on its input (`split` > 0: the shortcut split; `split_weight`: of the weight's grid too, module
    docstring); `smooth`: SmoothQuant's s (ptq/smooth.py), the quantizers then see W diag(s) and x / s; float while
    `quant` is off."""

    def __init__(
        self, layer: nn.Module, weight: WeightQuant, act: ActQuant | None, split: int = 0, smooth=None,
        learn: bool = True, split_weight: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.layer = layer.requires_grad_(False)
        self.register_buffer("smooth", smooth.to(layer.weight.device) if smooth is not None else None)
        self.weight_split = split if split_weight else 0
        cols = layer.weight[0].numel()
        groups = split_groups(cols, layer.weight.shape[1], self.weight_split)
        if learn:  # AdaRound; a method that learns no rounding: round to nearest, no copy of the weight
            w = layer.weight if smooth is None else layer.weight * self.smooth
            self.wq = AdaRoundQuantizer(w, weight.bits, weight.symmetric, weight.search, groups)
        else:
            self.wq = NearestQuantizer(layer, weight.bits, weight.symmetric, weight.search, smooth, groups)
        self.aq = LSQActQuantizer(act.bits, split, act.search) if act is not None else None
        self.quant = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.smooth
        if self.quant:
            x = x if self.aq is None else (self.aq(x) if s is None else (self.aq(x / s) * s).to(x.dtype))
            w = self.wq().to(x.dtype) if s is None else (self.wq() / s).to(x.dtype)
        else:
            if self.aq is not None and self.aq.observing:
                self.aq.observe(x if s is None else x / s)
            w = self.layer.weight
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, self.layer.bias)
        c = self.layer
        return F.conv2d(x, w, c.bias, c.stride, c.padding, c.dilation, c.groups)

    def export(self) -> nn.Module:
        aq = self.aq.to_act_quantizer(self.smooth) if self.aq is not None else None
        codes = self.wq.hard_codes()
        return from_codes(self.layer, codes, self.wq.qp, act_quant=aq, weight_split=self.weight_split)


def set_quant(module: nn.Module, on: bool) -> None:
    """Quantize (on) or run float (off) every PTQLayer and attention quantizer inside `module`."""
    for m in module.modules():
        if isinstance(m, PTQLayer):
            m.quant = on
        elif isinstance(m, LSQActQuantizer):
            m.enabled = on


def check_supported(unet: nn.Module, cfg: PTQConfig) -> None:
    for name, m in unet.named_modules():
        own = [p for n, p in m.named_parameters(recurse=False) if n not in FLOAT_TABLES]
        if listed(cfg.keep_fp, name):
            continue
        if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
            raise QuantuneError(f"{name} pads with {m.padding_mode!r}: add it to --keep-fp")
        if not own or isinstance(m, (nn.Linear, nn.Conv2d, *FLOAT_LEAVES)):
            continue
        raise QuantuneError(
            f"{name} is a {type(m).__name__}, which quantune's PTQ cannot quantize: add it to --keep-fp to leave it "
            "in float"
        )
    if cfg.attn is None:
        return

    for name, attn in attentions(unet).items():
        if (reason := unsupported_reason(attn)) is not None:
            raise QuantuneError(f"{name}: {reason}: pass --attn-bits none to keep attention products in float")


def shortcut_splits(unet: nn.Module, run) -> dict[str, int]:
    """{up-block ResNet shortcut conv name: channels of h in concat(h, skip)}, found on one forward (`run()`)."""
    splits: dict[str, int] = {}
    hooks = []
    for bname, block in unet.named_modules():
        if not bname.startswith("up_blocks.") or bname.count(".") != 1 or not hasattr(block, "resnets"):
            continue
        signature = inspect.signature(block.forward)

        def hook(module, args, kwargs, bname=bname, signature=signature):
            skips = signature.bind(*args, **kwargs).arguments.get("res_hidden_states_tuple")
            for i, resnet in enumerate(module.resnets):
                if skips is not None and getattr(resnet, "conv_shortcut", None) is not None and i < len(skips):
                    splits[f"{bname}.resnets.{i}.conv_shortcut"] = resnet.in_channels - skips[-1 - i].shape[1]

        hooks.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return splits


def wrap_for_ptq(
    unet: nn.Module, cfg: PTQConfig, splits: dict[str, int], smooth: dict | None = None, split_weight: bool = False
) -> dict[str, PTQLayer]:
    """Replace the model's layers by PTQLayers (`smooth`: SmoothQuant's s by layer name; `split_weight`: the
    shortcut split of the weight grid as well as of the input) and its attention processors by quantized ones (in
    place)."""
    smooth = smooth or {}
    check_supported(unet, cfg)
    wrapped = {}
    for name, m in list(unet.named_modules()):
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or listed(cfg.keep_fp, name):
            continue
        split = splits.get(name, 0)
        wrapped[name] = PTQLayer(m, cfg.weight_for(name), cfg.act_for(name), split, smooth.get(name),
                                 learn=cfg.learns, split_weight=split_weight)  # fmt: skip
        set_module(unet, name, wrapped[name])
    if cfg.attn is not None:
        for attn in attentions(unet).values():
            slots = {s: LSQActQuantizer(cfg.attn.bits, search=cfg.attn.search) for s in QuantAttnProcessor.SLOTS}
            quantize_attention(attn, cfg.attn.bits, slots)
    logger.info("wrapped %d layers for PTQ (%s)", len(wrapped), cfg.method)
    return wrapped


def recon_units(unet: nn.Module, run, unit_types: tuple) -> list[tuple[str, nn.Module]]:
    """Reconstruction units in the order one forward (`run()`) calls them: blocks (of `unit_types`, the model
    family's), then lone PTQLayers."""
    blocks = unit_types
    units: dict[str, nn.Module] = {}
    for name, m in unet.named_modules():
        inside = any(name.startswith(u + ".") for u in units)
        if not inside and (isinstance(m, blocks) or isinstance(m, PTQLayer)):
            if isinstance(m, PTQLayer) or any(isinstance(c, PTQLayer) for c in m.modules()):
                units[name] = m
    order: list[str] = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, n=n: order.append(n) if n not in order else None)
        for n, m in units.items()
    ]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    never = [n for n in units if n not in order]
    if never:
        logger.warning("%d quantized units are never called by the UNet (e.g. %s)", len(never), never[0])
    return [(n, units[n]) for n in order]


def export_integer(unet: nn.Module) -> int:
    """Replace every PTQLayer by its integer layer and every attention's LSQ quantizers by fixed ones (in place)."""
    names = [n for n, m in unet.named_modules() if isinstance(m, PTQLayer)]
    for name in names:
        set_module(unet, name, unet.get_submodule(name).export())
    for attn in attentions(unet).values():
        proc = attn.processor
        if isinstance(proc, QuantAttnProcessor) and isinstance(proc.quantizers["q"], LSQActQuantizer):
            device = proc.quantizers["q"].log_scale.device
            fixed = {s: proc.quantizers[s].to_act_quantizer().to(device) for s in QuantAttnProcessor.SLOTS}
            attn.set_processor(QuantAttnProcessor(proc.bits, fixed, proc.inner))
    return len(names)
