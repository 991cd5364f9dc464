"""Table 1, training: step time (it/s) and peak memory of one UNet training step, per resolution x batch
(lora_wrapper's layout), for quantune's methods and the peers a user would pick instead.

quantune: full fine-tuning, lora, qlora / intlora-mul / intlora-shift at W8A8 and W4A8, each applied exactly as
`quantune train` applies it (train/registry.py), with every UNet Linear / Conv2d quantized (quant.quantize_rest, as
the IntLoRA reference) and A8 activations calibrated on one batch.
Peers, LoRA on the same targets with peft (rank 4, gaussian init):
- diffusers + peft: `unet.add_adapter(peft.LoraConfig(...))`, diffusers' train_text_to_image_lora.py;
- peft + bitsandbytes NF4 (QLoRA): every UNet Linear replaced by bnb.nn.Linear4bit (compute in fp32), as
  `from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True))` does; convs stay float;
- peft + torchao int8 weight-only: `quantize_(unet, Int8WeightOnlyConfig())` (Linear layers), then add_adapter.
A peer that is not installed gives a row saying so. Each variant runs in its own process: build, apply, then
`warmup` untimed and `reps` timed AdamW steps (an MSE loss of the UNet output against its random input latents:
the step's cost does not depend on the target); peak memory over the steps
only (CUDA: peak allocated; CPU: peak RSS after the set-up's freed pages are returned).

    python -m quantune.bench.training [--quick] --out DIR
"""

from __future__ import annotations

import logging
import time
from statistics import median

import torch

from quantune.allocator import keep_freed_memory
from quantune.bench.common import (
    Plot,
    Table,
    device,
    peak_mb,
    reset_peak,
    run_child,
    table_main,
    timed,
)
from quantune.bench.models import TARGETS, build
from quantune.quant.train_kernels import backward_dtype

logger = logging.getLogger(__name__)
RANK = 4
QUANTUNE = [("full", 32), ("lora", 32)] + [(m, b) for b in (8, 4) for m in ("qlora", "intlora-mul", "intlora-shift")]
QUANTUNE += [("intlora-mul, R* regenerated", 4), ("intlora-mul, gradient checkpointing", 4)]
VARIANT_SETS = {
    "R* regenerated": ["quant.cache_aux=false"],  # IntLoRA without its fp16 R* cache
    "gradient checkpointing": ["train.gradient_checkpointing=true"],
}  # a suffix after ", " -> overrides
PEERS = ["diffusers+peft lora", "peft+bnb nf4 qlora", "peft+torchao int8wo lora"]


def settings(quick: bool) -> list[tuple[str, int, int]]:
    """(model, resolution px, batch) rows of the table."""
    cuda = [("sd15", 512, 1), ("sd15", 512, 4)] if torch.cuda.is_available() else []  # SD-1.5 rows at 512 px
    if quick:
        return [("zoo:emoji", 32, 8)] + cuda[:1]
    return [("zoo:emoji", 32, 8), ("zoo:emoji", 64, 8), ("sd15", 256, 1)] + (cuda or [("sd15", 512, 1)])


def skipped(model: str, res: int, variant: str) -> bool:
    """Full fine-tuning of the SD-1.5 UNet at 512 px on CPU: ~26 GB (weights, gradients, Adam's state and the
    activations), beyond the 24 GB machine this table runs on."""
    return variant == "full" and model == "sd15" and res >= 512 and not torch.cuda.is_available()


def _quantune(bm, variant: str, bits: int, x, t, cond) -> list:
    from quantune.train.config import resolve_config
    from quantune.train.registry import METHODS

    method, _, suffix = variant.partition(", ")
    sets = [f"method={method}", "task=" + ("full" if method == "full" else "text-to-image"), f"lora.r={RANK}"]
    sets += VARIANT_SETS.get(suffix, [])
    if bits < 32:
        sets += [f"quant.bits={bits}", "quant.act_bits=8", "quant.quantize_rest=true", "quant.search='minmax'"]
    cfg = resolve_config(None, sets)
    training = METHODS[method]()
    groups = training.prepare(bm.pipe, cfg)
    denoiser = bm.denoiser.to(device())
    training.calibrate(bm.pipe, lambda: bm.forward(denoiser, x, t, cond))
    training.ready(bm.pipe)  # as the trainer: the integer layers' kernels (quant/train_kernels.py)
    if cfg.train.gradient_checkpointing:  # as the trainer does
        denoiser.enable_gradient_checkpointing()
    return [p for g in groups for p in g["params"]]


def _to_bnb_nf4(module: torch.nn.Module) -> None:
    import bitsandbytes as bnb

    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear):
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=torch.float32, quant_type="nf4")  # fmt: skip
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, name, q.to(device()))  # .to() quantizes
        else:
            _to_bnb_nf4(child)


def _peer(bm, variant: str) -> list:
    from peft import LoraConfig

    model = bm.denoiser
    model.requires_grad_(False)
    if variant.startswith("peft+bnb"):
        _to_bnb_nf4(model)
    elif variant.startswith("peft+torchao"):
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model.to(device()), Int8WeightOnlyConfig())
    config = LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=bm.targets)
    if hasattr(model, "add_adapter"):  # diffusers' PeftAdapterMixin, as its training scripts call it
        model.add_adapter(config)
    else:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, model)
    return [p for p in model.parameters() if p.requires_grad]


def weights_label(variant: str, bits: int) -> str:
    """The base weights of a variant: fp32, quantune's W{bits}A8, or a peer's quantized Linear layers."""
    if "bnb" in variant:
        return "NF4 (Linear)"
    if "torchao" in variant:
        return "int8 (Linear)"
    return "fp32" if bits == 32 else f"W{bits}A8"


def run_variant(variant: str, bits: int, model: str, res: int, batch: int, reps: int, warmup: int) -> dict:
    row = {"model": model, "res": res, "batch": batch, "variant": variant, "weights": weights_label(variant, bits)}
    if variant not in PEERS:
        keep_freed_memory()  # as the `quantune` command does (allocator.py); the peers run as their scripts do
    bm = build(model)
    x, t, cond = _to_device(bm.batch(batch, res))
    start = time.perf_counter()
    try:
        params = _peer(bm, variant) if variant in PEERS else _quantune(bm, variant, bits, x, t, cond)
    except ModuleNotFoundError as e:  # a peer that is not installed
        return {**row, "status": f"not installed ({e.name})"}
    setup_s = time.perf_counter() - start
    denoiser = bm.denoiser.to(device()).train()
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step():
        loss = torch.nn.functional.mse_loss(bm.forward(denoiser, x, t, cond).float(), x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        step()  # optimizer state exists before the window opens, as in a long run
        base = reset_peak()
        times = timed(step, reps, max(warmup - 1, 0))
    except torch.cuda.OutOfMemoryError:
        return {**row, "status": "out of memory"}
    s, peak = median(times), peak_mb()
    return {**row, "status": "ok", "step_s": s, "it_s": 1 / s, "peak_mb": peak, "before_steps_mb": base,
            "step_mb": peak - base,
            "setup_s": setup_s, "trainable": sum(p.numel() for p in params), "device": device().type}  # fmt: skip


def against_peft(group: list[dict]) -> None:
    """Each measured row's step time and peak memory as ratios of the diffusers + peft row of its setting."""
    peer = next(g for g in group if g["variant"] == PEERS[0])
    for g in group:
        if g.get("status") == "ok" and peer.get("status") == "ok":
            g["time_vs_peft"] = g["step_s"] / peer["step_s"]
            g["memory_vs_peft"] = g["peak_mb"] / peer["peak_mb"]


def _to_device(value):
    if isinstance(value, torch.Tensor):
        return value.to(device())
    if isinstance(value, dict):
        return {k: _to_device(v) for k, v in value.items()}
    return tuple(_to_device(v) for v in value)


def table(quick: bool) -> Table:
    reps, warmup = (5, 1) if quick else (7, 2)
    rows = []
    for model, res, batch in settings(quick):
        r, w = (1, 1) if model == "sd15" and not torch.cuda.is_available() else (reps, warmup)
        group = []
        for variant, bits in QUANTUNE + [(p, 32) for p in PEERS]:
            if skipped(model, res, variant):
                continue
            args = ["--one", variant, bits, model, res, batch, r, w]
            group.append(run_child("quantune.bench.training", args))
        against_peft(group)
        rows += group
    return Table(
        "training",
        f"Training step, UNet, rank-{RANK} LoRA on {TARGETS} (quantized methods: every Linear / Conv2d quantized)",
        {"model": "{model}", "res x batch": "{res} x {batch}", "variant": "{variant}", "weights": "{weights}",
         "it/s": "{it_s:.2f}", "step (s)": "{step_s:.3f}", "peak MB": "{peak_mb:.0f}",
         "added by the steps (MB)": "{step_mb:.0f}",
         "time vs peft": "{time_vs_peft:.2f}", "memory vs peft": "{memory_vs_peft:.2f}",
         "trainable": "{trainable:,}", "status": "{status}"},
        rows,
        Plot("{model} {res}x{batch} {variant} {weights}", {"it/s": "it_s", "peak MB over the steps": "peak_mb"}),
        notes=[f"median of {reps} steps after {warmup} warm-up (sd15 on CPU: one timed step after one untimed)",
               "peak memory over the timed steps only (optimizer state included, set-up excluded); on CPU the peak "
               "is the process's resident memory, libraries included (~0.5 GB); 'added by the steps' is the peak "
               "minus the memory held when the steps began (activations, gradients)",
               "bnb and torchao quantize Linear layers only (convs stay fp32); quantune's quantized methods quantize "
               "convs too; full fine-tuning trains every UNet weight (not run at 512 px on CPU: ~26 GB)",
               "quantune's rows run with malloc keeping freed blocks (allocator.py, as the `quantune` command sets "
               "it); the peers run as their own scripts do",
               "quantized methods: frozen layers forward on int8 kernels, input gradients in "
               f"{str(backward_dtype('auto', device())).removeprefix('torch.')} here (quant.backward_dtype = auto), "
               "IntLoRA steps as one autograd function (quant/intlora_train.py)"],
    )  # fmt: skip


def _one(variant, bits, model, res, batch, reps, warmup) -> dict:
    return run_variant(variant, int(bits), model, int(res), int(batch), int(reps), int(warmup))


def main() -> None:
    table_main(__doc__, lambda quick, out: table(quick), _one, 7)


if __name__ == "__main__":
    main()
