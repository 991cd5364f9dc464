"""Table 3, inference: denoiser forward latency, and whole-pipeline latency, fp32 against quantune's integer models
(W8A8, W4A8: int8 kernels; W4A16: weights dequantized on the fly) and the engines a user would pick instead:
OpenVINO (its fp32 graph, INT8 by NNCF's post-training quantization and INT4 weight-only by NNCF's weight
compression: bench/openvino_peer.py), torchao (int8 dynamic activations + int8 weights; int8 weight-only) and
optimum-quanto (qint8 weights and activations; qint4 weights). bf16 autocast is the float alternative.

Models: zoo:emoji, the SD-1.5 UNet architecture, PixArt-Sigma (0.6 B) and SD3.5-medium (2.5 B) at real size,
randomly initialised (bench/models.py). The denoiser's forward arguments are those its family's `predict` passes
(`denoiser_kwargs`): random text inputs of the real widths and caption lengths. quantune's variants are calibrated
the way `quantune quantize --method minmax` does (an integer model's speed does not depend on the method), on two
random input batches, as quanto and NNCF are. Each variant runs in its own process on the same seeded inputs; median
of `reps` timed calls after a warm-up; each output's SQNR against fp32's (saved by the fp32 process). Pipeline rows
time `pipe(prompt, num_inference_steps=20)` (classifier-free guidance: the UNet runs at batch 2).

    python -m quantune.bench.inference [--quick] --out DIR
"""

from __future__ import annotations

import inspect
import logging
import os
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

from quantune.bench.common import Plot, Table, device, run_child, table_main, timed
from quantune.bench.models import BenchModel, build
from quantune.bench.openvino_peer import openvino_variant
from quantune.errors import QuantuneError

logger = logging.getLogger(__name__)
CHILD_TIMEOUT_S = 3600  # one variant of the largest model (SD3.5-medium at 512 px) takes ~15 min on 2 cores


class _Stop(Exception):
    pass


def denoiser_kwargs(bm: BenchModel, batch: int, res: int, seed: int = 0) -> dict:
    """The denoiser's forward keyword arguments for one seeded call at `res` px, as its family's `predict` builds
    them (FLUX's packing, PixArt's mask, SD3's pooled projections), without running the denoiser."""
    model = bm.denoiser
    signature = inspect.signature(model.forward)
    seen: dict = {}

    def grab(module, args, kwargs):
        seen.update(signature.bind(*args, **kwargs).arguments)
        raise _Stop

    x, t, cond = bm.batch(batch, res, seed)
    hook = model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        bm.forward(model, x.to(device()), t.to(device()), {k: _to(v) for k, v in cond.items()})
    except _Stop:
        pass
    finally:
        hook.remove()
    seen.pop("return_dict", None)
    return seen


def _to(v):
    return v.to(device()) if isinstance(v, torch.Tensor) else v


def prediction(out) -> torch.Tensor:
    """A denoiser's output tensor: `.sample`, or the first of a tuple, or the tensor itself."""
    if isinstance(out, torch.Tensor):
        return out
    return out.sample if hasattr(out, "sample") else out[0]


def quantune_int(model, calib: list[dict], wbits: int, abits: int | None):
    """minmax PTQ of every layer (quantized attention unless weight-only) through the public entry point
    (quantune.ptq.quantize_model) on the given forward-argument batches, exported to integers, kernels prepared."""
    from quantune.ptq import PTQConfig, quantize_model
    from quantune.quant.kernels import prepare_int_kernels

    quantize_model(model, calib, PTQConfig(method="minmax", wbits=wbits, abits=abits), progress=False)
    logger.info("quantune kernels: %s", dict(prepare_int_kernels(model)))
    return model


def quantune_openvino(wbits: int, abits: int | None):
    """quantune_int's model on OpenVINO (quant/ov_runtime.py, the CPU default of `load_pipeline` / `generate`),
    converted here for the calibration batches' signature (the timed calls' shapes), so `prepare_s` includes it."""

    def apply(model, calib):
        from quantune.quant.ov_export import openvino_missing
        from quantune.quant.ov_runtime import OpenVINOModule

        if openvino_missing() is not None or next(model.parameters()).device.type != "cpu":
            raise ModuleNotFoundError("OpenVINO runs on the CPU here", name="openvino (CPU only)")
        runner = OpenVINOModule(quantune_int(model, calib, wbits, abits))
        with torch.no_grad():
            runner(**calib[0])
        if runner.calls["openvino"] != 1:  # the row would time PyTorch's kernels under OpenVINO's name
            raise QuantuneError("OpenVINO could not convert the integer model (its warning is above)")
        return runner

    return apply


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
                for kwargs in calib:
                    unet(**kwargs)
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
    "quantune W8A8 (openvino)": quantune_openvino(8, 8),
    "quantune W4A8 (openvino)": quantune_openvino(4, 8),
    "quantune W4A16 (openvino)": quantune_openvino(4, None),
    "torchao int8 dyn": _torchao("dyn"),
    "torchao int8 weight-only": _torchao("wo"),
    "quanto W8A8": _quanto(8, True),
    "quanto W4 weight-only": _quanto(4, False),
    "openvino fp32": openvino_variant("fp32"),
    "openvino INT8 (nncf)": openvino_variant("int8"),
    "openvino INT4 weight-only (nncf)": openvino_variant("int4"),
}


def _prepared(name: str, bm: BenchModel, calib: list[dict]):
    """(what runs the denoiser for variant `name`, seconds it took to prepare)."""
    model = bm.denoiser.eval().requires_grad_(False)
    start = time.perf_counter()
    runner = VARIANTS[name](model, calib)
    return runner, time.perf_counter() - start


def _caller(name: str, bm: BenchModel, kind: str, runner, batch: int, res: int):
    """The timed call: one denoiser forward (its prediction), or the whole pipeline with `runner` inside."""
    if kind == "denoiser":
        kwargs = denoiser_kwargs(bm, batch, res)

        def call():
            return prediction(runner(**kwargs))
    else:
        setattr(bm.pipe, bm.family.denoiser, runner)
        gen = torch.Generator().manual_seed(0)

        def call():
            gen.manual_seed(0)
            return bm.pipe("cat face", num_inference_steps=20, height=res, width=res, generator=gen,
                           output_type="pt", **bm.family.guidance_kwargs(bm.pipe, 4.0, 1),
                           **bm.family.call_kwargs(bm.pipe)).images  # fmt: skip

    return _autocast_bf16(call) if name == "bf16 autocast" else call


def run_variant(name: str, model: str, kind: str, res: int, batch: int, reps: int, ref_file: str) -> dict:
    from quantune.models.loading import to_device
    from quantune.quant.primitives import sqnr_db

    row = {"model": model, "kind": kind, "res": res, "batch": batch, "variant": name}
    bm = build(model)
    to_device(bm.pipe, device())  # before quantizing: integer kernels are prepared for the device they run on
    calib = [denoiser_kwargs(bm, batch, res, seed=s) for s in (1, 2)]
    try:
        runner, prepare_s = _prepared(name, bm, calib)
    except ModuleNotFoundError as e:  # a peer that is not installed (or cannot run here)
        return {**row, "status": f"not installed ({e.name})"}
    call = _caller(name, bm, kind, runner, batch, res)
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
    """(model, denoiser | pipeline, res px, batch, reps); QUANTUNE_INFERENCE_MODELS (comma-separated model names)
    keeps those models' settings only."""
    cuda = [("sd15", "denoiser", 512, 2, 10)] if torch.cuda.is_available() else []  # SD-1.5 rows at 512 px
    if quick:
        rows = [("zoo:emoji", "denoiser", 32, 2, 10), ("zoo:emoji", "pipeline", 32, 1, 3)] + cuda
    else:
        rows = [("zoo:emoji", "denoiser", 32, 2, 20), ("zoo:emoji", "pipeline", 32, 1, 5),
                ("sd15", "denoiser", 256, 2, 5), ("pixart-sigma", "denoiser", 512, 2, 3),
                ("sd3.5-medium", "denoiser", 512, 2, 2)] + (cuda or [("sd15", "denoiser", 512, 2, 3)])  # fmt: skip
    keep = [m.strip() for m in os.environ.get("QUANTUNE_INFERENCE_MODELS", "").split(",") if m.strip()]
    return [r for r in rows if r[0] in keep] if keep else rows


# the weight-only peers, slower than fp32 at every size measured, are left out where one variant costs ~5 minutes
SKIPPED = {"sd3.5-medium": ("torchao int8 weight-only", "quanto W4 weight-only")}
PIPELINE_VARIANTS = ["fp32", "quantune W8A8", "quantune W4A8", "quantune W4A16", "quantune W8A8 (openvino)",
                     "quantune W4A16 (openvino)", "torchao int8 dyn", "quanto W8A8"]  # fmt: skip
OURS = ("quantune W8A8 (openvino)", "quantune W8A8")  # the "ahead by" column's reference: the default backend's


def _group(model: str, kind: str, res: int, batch: int, reps: int) -> list[dict]:
    """Every variant of one setting, each in its own process (fp32 first: its output is the SQNR reference); a
    variant that fails becomes a row saying so."""
    group = []
    with tempfile.TemporaryDirectory() as tmp:
        ref = str(Path(tmp) / "fp32.pt")
        names = [n for n in (VARIANTS if kind == "denoiser" else PIPELINE_VARIANTS) if n not in SKIPPED.get(model, ())]
        for name in names:
            args = ["--one", name, model, kind, res, batch, reps, ref]
            try:
                group.append(run_child("quantune.bench.inference", args, timeout=CHILD_TIMEOUT_S))
            except QuantuneError as e:  # out of memory, a peer's failure: the row says so, the table goes on
                logger.warning("%s", e)
                status = str(e).splitlines()[-1][:120]
                group.append({"model": model, "kind": kind, "res": res, "batch": batch, "variant": name,
                              "status": f"failed: {status}"})  # fmt: skip
    fp32 = group[0].get("median_ms", float("nan"))
    timed_ok = {g["variant"]: g["median_ms"] for g in group if g.get("status") == "ok"}
    ours = next((timed_ok[n] for n in OURS if n in timed_ok), float("nan"))
    for g in group:
        if g.get("status") == "ok":
            g["speedup_vs_fp32"] = fp32 / g["median_ms"]
            g["w8a8_ahead_x"] = g["median_ms"] / ours
    return group


DIT_MODELS = ("pixart-sigma", "sd3.5-medium")  # their rows are the inference_dit table
COLUMNS = {"model": "{model}", "what": "{kind}", "res x batch": "{res} x {batch}", "variant": "{variant}",
           "median ms": "{median_ms:.1f}", "vs fp32": "{speedup_vs_fp32:.2f}x",
           "quantune W8A8 (default backend) ahead by": "{w8a8_ahead_x:.2f}x", "SQNR vs fp32 (dB)": "{sqnr_db:.1f}",
           "prepare (s)": "{prepare_s:.1f}", "status": "{status}"}  # fmt: skip
NOTES = [
    "OpenVINO: the float model converted to IR, fp32, INT8 by nncf.quantize (model_type TRANSFORMER) on the same "
    "two calibration batches, or INT4 weight-only by nncf.compress_weights (INT4_ASYM, per output channel, every "
    "MatMul; NNCF keeps convolutions in INT8); torchao quantizes Linear layers only, with dynamic per-token "
    "activation scales; quanto quantizes Linear, Conv2d (and LayerNorm outputs) with activation scales calibrated "
    "on the same two batches; quantune quantizes Linear and Conv2d (and attention's q / k / v) with static "
    "calibrated scales",
    "quantune W8A8 / W4A8 / W4A16: PyTorch's oneDNN kernels (or weights dequantized per forward); (openvino): the "
    "same integer model on OpenVINO (quantune's integers and scales as FakeQuantize and int8 constants; the default "
    "CPU backend), conversion included in prepare",
    "quantune's variants here are minmax-calibrated on two random input batches (an integer model's speed does not "
    "depend on its calibration), so their SQNR is not what PTQ reaches: see quality_ptq",
]


def table(quick: bool) -> list[Table]:
    """Two tables: `inference` (zoo:emoji and the SD-1.5 UNet) and `inference_dit` (the transformers), each
    written when it has rows (QUANTUNE_INFERENCE_MODELS can leave one out)."""
    rows = [row for setting in settings(quick) for row in _group(*setting)]
    unet = [r for r in rows if r["model"] not in DIT_MODELS]
    dit = [r for r in rows if r["model"] in DIT_MODELS]
    title = "Inference latency: {}, fp32 vs integer models"
    plot = Plot("{model} {kind} {res}px {variant}", {"speed-up vs fp32 (x)": "speedup_vs_fp32"})
    unet_notes = ["sd15 = the SD-1.5 UNet architecture, randomly initialised (speed is real, SQNR is not a quality "
                  "figure); zoo:emoji's SQNR is on its trained weights; pipeline rows: 20 steps, guidance 4, the "
                  "final images' SQNR (pixels in [0, 1])"]  # fmt: skip
    dit_notes = ["pixart-sigma = PixArt-Sigma XL/2 (0.6 B), sd3.5-medium = SD3.5-medium's transformer (2.5 B), "
                 "randomly initialised (speed is real, SQNR is not a quality figure); sd3.5-medium has no weight-only "
                 "peer rows (torchao int8 weight-only, quanto W4: slower than fp32 on every other model, ~5 min a "
                 "row there)"]  # fmt: skip
    out = []
    if unet:
        out.append(Table("inference", title.format("UNet forward and whole pipeline"), COLUMNS, unet, plot,
                         notes=unet_notes + NOTES))  # fmt: skip
    if dit:
        out.append(Table("inference_dit", title.format("diffusion transformer forward at real size"), COLUMNS, dit,
                         plot, notes=dit_notes + NOTES))  # fmt: skip
    return out


def _one(name, model, kind, res, batch, reps, ref) -> dict:
    return run_variant(name, model, kind, int(res), int(batch), int(reps), ref)


def main() -> None:
    table_main(__doc__, lambda quick, out: table(quick), _one, 7)


if __name__ == "__main__":
    main()
