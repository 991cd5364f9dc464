"""Table 3, inference: UNet forward latency, and whole-pipeline latency, fp32 against quantune's integer models
(W8A8, W4A8: int8 kernels; W4A16: weights dequantized on the fly) and the quantizers a user would pick instead:
torchao (int8 dynamic activations + int8 weights; int8 weight-only) and optimum-quanto (qint8 weights and
activations; qint4 weights). bf16 autocast is the float alternative.

quantune's variants are calibrated the way `quantune quantize --method minmax` does (an integer model's speed does
not depend on the method), on two random input batches. Each variant runs in its own process on the same seeded
inputs; median of `reps` timed calls after a warm-up; each output's SQNR against fp32's (saved by the fp32 process).
Pipeline rows time `pipe(prompt, num_inference_steps=20)` (classifier-free guidance: the UNet runs at batch 2).

    python -m quantune.bench.inference [--quick] --out DIR
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

from quantune.bench.common import Plot, Table, device, run_child, table_main, timed
from quantune.bench.models import build

logger = logging.getLogger(__name__)


UNET_ARGS = ("sample", "timestep", "encoder_hidden_states")  # BenchModel.inputs' order


def quantune_int(unet, calib: list[tuple], wbits: int, abits: int | None):
    """minmax PTQ of every layer (quantized attention unless weight-only) through the public entry point
    (quantune.ptq.quantize_model) on the given input batches, exported to integers, kernels prepared."""
    from quantune.ptq import PTQConfig, quantize_model
    from quantune.quant.kernels import prepare_int_kernels

    batches = [dict(zip(UNET_ARGS, args, strict=True)) for args in calib]
    quantize_model(unet, batches, PTQConfig(method="minmax", wbits=wbits, abits=abits), progress=False)
    logger.info("quantune kernels: %s", dict(prepare_int_kernels(unet)))
    return unet


def _torchao(config: str):
    def apply(unet, calib):
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

        quantize_(unet, {"dyn": Int8DynamicActivationInt8WeightConfig, "wo": Int8WeightOnlyConfig}[config]())
        return unet

    return apply


def _quanto(wbits: int, act: bool):
    def apply(unet, calib):
        from optimum.quanto import Calibration, freeze, qint4, qint8, quantize

        quantize(unet, weights=qint8 if wbits == 8 else qint4, activations=qint8 if act else None)
        if act:
            with torch.no_grad(), Calibration():
                for args in calib:
                    unet(*args)
        freeze(unet)
        return unet

    return apply


def _autocast_bf16(fn):
    def run(*args, **kwargs):
        with torch.autocast(device().type, dtype=torch.bfloat16):
            return fn(*args, **kwargs)

    return run


VARIANTS = {
    "fp32": lambda unet, calib: unet,
    "bf16 autocast": lambda unet, calib: unet,  # wrapped at call time
    "quantune W8A8": lambda unet, calib: quantune_int(unet, calib, 8, 8),
    "quantune W4A8": lambda unet, calib: quantune_int(unet, calib, 4, 8),
    "quantune W4A16": lambda unet, calib: quantune_int(unet, calib, 4, None),
    "torchao int8 dyn": _torchao("dyn"),
    "torchao int8 weight-only": _torchao("wo"),
    "quanto W8A8": _quanto(8, True),
    "quanto W4 weight-only": _quanto(4, False),
}


def run_variant(name: str, model: str, kind: str, res: int, batch: int, reps: int, ref_file: str) -> dict:
    from quantune.quant.primitives import sqnr_db

    row = {"model": model, "kind": kind, "res": res, "batch": batch, "variant": name}
    from quantune.models.loading import to_device

    bm = build(model)
    to_device(bm.pipe, device())  # before quantizing: integer kernels are prepared for the device they run on
    unet = bm.unet.eval().requires_grad_(False)
    calib = [tuple(v.to(device()) for v in bm.inputs(batch, res, seed=s)) for s in (1, 2)]
    start = time.perf_counter()
    try:
        bm.pipe.unet = VARIANTS[name](unet, calib)
    except ModuleNotFoundError as e:  # a peer that is not installed
        return {**row, "status": f"not installed ({e.name})"}
    prepare_s = time.perf_counter() - start
    if kind == "unet":
        args = tuple(v.to(device()) for v in bm.inputs(batch, res))

        def call():
            return bm.pipe.unet(*args).sample
    else:
        gen = torch.Generator().manual_seed(0)

        def call():
            gen.manual_seed(0)
            return bm.pipe("cat face", num_inference_steps=20, height=res, width=res, generator=gen,
                           guidance_scale=4.0, output_type="pt").images  # fmt: skip

    if name == "bf16 autocast":
        call = _autocast_bf16(call)
    try:
        with torch.no_grad():  # not inference_mode: quanto's qint4 modules refuse it
            out = call().float().cpu()
            times = timed(call, reps, 0)
    except torch.cuda.OutOfMemoryError:
        return {**row, "status": "out of memory"}
    if name == "fp32":
        torch.save(out, ref_file)
    sqnr = sqnr_db(torch.load(ref_file, weights_only=True), out) if Path(ref_file).exists() else float("nan")
    return {**row, "status": "ok", "median_ms": median(times) * 1000, "prepare_s": prepare_s, "sqnr_db": sqnr,
            "device": device().type}  # fmt: skip


def settings(quick: bool) -> list[tuple[str, str, int, int, int]]:
    """(model, unet | pipeline, res px, batch, reps)."""
    cuda = [("sd15", "unet", 512, 2, 10)] if torch.cuda.is_available() else []  # SD-1.5 rows at 512 px
    if quick:
        return [("zoo:emoji", "unet", 32, 2, 10), ("zoo:emoji", "pipeline", 32, 1, 3)] + cuda
    return [("zoo:emoji", "unet", 32, 2, 20), ("zoo:emoji", "pipeline", 32, 1, 5), ("sd15", "unet", 256, 2, 5)] + cuda


def table(quick: bool) -> Table:
    rows = []
    for model, kind, res, batch, reps in settings(quick):
        variants = list(VARIANTS) if kind == "unet" else ["fp32", "quantune W8A8", "quantune W4A8", "quantune W4A16",
                                                          "torchao int8 dyn", "quanto W8A8"]  # fmt: skip
        group = []
        with tempfile.TemporaryDirectory() as tmp:
            ref = str(Path(tmp) / "fp32.pt")
            for name in variants:  # fp32 first: its output is the SQNR reference
                args = ["--one", name, model, kind, res, batch, reps, ref]
                group.append(run_child("quantune.bench.inference", args))
        fp32 = group[0].get("median_ms", float("nan"))
        ours = next(g.get("median_ms", float("nan")) for g in group if g["variant"] == "quantune W8A8")
        for g in group:
            if g.get("status") == "ok":
                g["speedup_vs_fp32"] = fp32 / g["median_ms"]
                g["w8a8_ahead_x"] = g["median_ms"] / ours
        rows += group
    return Table(
        "inference",
        "Inference latency: UNet forward and whole pipeline (20 DDIM steps, guidance 4), fp32 vs integer models",
        {"model": "{model}", "what": "{kind}", "res x batch": "{res} x {batch}", "variant": "{variant}",
         "median ms": "{median_ms:.1f}", "vs fp32": "{speedup_vs_fp32:.2f}x",
         "quantune W8A8 ahead by": "{w8a8_ahead_x:.2f}x", "SQNR vs fp32 (dB)": "{sqnr_db:.1f}",
         "prepare (s)": "{prepare_s:.1f}", "status": "{status}"},
        rows,
        Plot("{model} {kind} {res}px {variant}", {"speed-up vs fp32 (x)": "speedup_vs_fp32"}),
        notes=["sd15 = the SD-1.5 UNet architecture, randomly initialised (speed is real, SQNR is not a quality "
               "figure); zoo:emoji's SQNR is on its trained weights",
               "torchao quantizes Linear layers only, with dynamic per-token activation scales; quanto quantizes "
               "Linear, Conv2d (and LayerNorm outputs) with activation scales calibrated on the same two batches; "
               "quantune quantizes Linear and Conv2d (and attention's q / k / v) with static calibrated scales",
               "quantune's variants here are minmax-calibrated on two random input batches (an integer model's speed "
               "does not depend on its calibration), so their SQNR is not what PTQ reaches: see quality_ptq",
               "pipeline SQNR compares the final images (pixels in [0, 1])"],
    )  # fmt: skip


def _one(name, model, kind, res, batch, reps, ref) -> dict:
    return run_variant(name, model, kind, int(res), int(batch), int(reps), ref)


def main() -> None:
    table_main(__doc__, lambda quick, out: table(quick), _one, 7)


if __name__ == "__main__":
    main()
