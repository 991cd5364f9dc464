"""PTQ of the tiny diffusion transformers (random weights): the SQNR of the whole model and of each integer layer,
fake quantization against the integer kernels, for each method, W8A8 / W4A8, per-tensor or SmoothQuant activations,
and (minmax W8A8) with the patch embedding's input quantized too, which the families keep float.

Per run: quantize the family's tiny zoo model (`quantune.quantize_pipeline`, a few calibration samples and
iterations), then on one fixed denoiser call (tests/families' inputs):
- model SQNR of the fake-quantized model (integer layers, float arithmetic) and of the integer-kernel model against
  fp32, and of the integer model against the fake one;
- per integer layer: the SQNR of its int8-kernel output against its fake-quantized output on the input it sees in
  that call (min and median over the layers; weight-only layers, which have no kernel, are left out).
Random weights have no outlier channels: these figures check the integer path, not a real model's quality.

    python benchmarks/dit_ptq_sqnr.py [--families pixart,sd3,flux] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from report import write_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.families: the fixed denoiser call

SMALL = dict(calib_samples=8, steps=4, iters=20, batch_size=8, resolution=16)


def layer_sqnrs(pipe, model) -> list[float]:
    """Each integer layer's int8-kernel output against its fake-quantized output, on its input in one call."""
    from tests.families.conftest import family_outputs

    from quantune.quant.kernels import drop_int_kernels, prepare_int_kernels
    from quantune.quant.primitives import sqnr_db
    from quantune.quant.quantize import quant_layers

    inputs, hooks = {}, []
    for name, layer in quant_layers(model).items():
        hooks.append(layer.register_forward_pre_hook(lambda m, a, n=name: inputs.setdefault(n, a[0].detach())))
    family_outputs(pipe)
    for h in hooks:
        h.remove()
    layers = quant_layers(model)
    with torch.no_grad():
        fake = {n: layers[n](x) for n, x in inputs.items()}
        prepare_int_kernels(model)
        out = [sqnr_db(fake[n], layers[n](x)) for n, x in inputs.items() if layers[n].kernel is not None]
    drop_int_kernels(model)
    return out


def run(name: str, method: str, wbits: int, smooth: float | None, patch_quantized: bool = False) -> dict:
    from tests.families.conftest import MODELS, family_outputs

    from quantune.families import family_of
    from quantune.models import load_pipeline
    from quantune.ptq import PTQConfig, quantize_pipeline
    from quantune.quant.kernels import prepare_int_kernels
    from quantune.quant.primitives import sqnr_db

    pipe = load_pipeline(MODELS[name])
    model = family_of(pipe).denoiser_of(pipe)
    fp = family_outputs(pipe)[1]
    act_fp = ["^proj_out$"] if patch_quantized else None  # None: the family's (patch embedding and proj_out)
    cfg = PTQConfig(method=method, wbits=wbits, smooth=smooth, act_fp=act_fp, **SMALL)
    quantize_pipeline(pipe, cfg, progress=False)
    fake = family_outputs(pipe)[1]
    per_layer = layer_sqnrs(pipe, model)
    prepare_int_kernels(model)
    integer = family_outputs(pipe)[1]
    activations = "per tensor" if smooth is None else f"SmoothQuant {smooth}"
    activations += ", patch embedding's input quantized" if patch_quantized else ""
    return {"family": name, "method": method, "bits": f"W{wbits}A8", "activations": activations,
            "fake_vs_fp32": sqnr_db(fp, fake), "int_vs_fp32": sqnr_db(fp, integer),
            "int_vs_fake": sqnr_db(fake, integer), "layers": len(per_layer), "layer_min": min(per_layer),
            "layer_median": statistics.median(per_layer)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default="pixart,sd3,flux")
    p.add_argument("--methods", default="minmax,qdiffusion,eda-dm")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    torch.manual_seed(0)
    rows = [
        run(name, method, wbits, smooth)
        for name in a.families.split(",")
        for method in a.methods.split(",")
        for wbits in (8, 4)
        for smooth in (None, 0.5)
    ]
    rows += [run(name, "minmax", 8, None, patch_quantized=True) for name in a.families.split(",")]
    columns = {"family": "{family}", "method": "{method}", "bits": "{bits}", "activations": "{activations}",
               "fake vs fp32 (dB)": "{fake_vs_fp32:.1f}", "integer vs fp32 (dB)": "{int_vs_fp32:.1f}",
               "integer vs fake (dB)": "{int_vs_fake:.1f}", "int8 layers": "{layers}",
               "layer int vs fake, min (dB)": "{layer_min:.1f}", "median (dB)": "{layer_median:.1f}"}  # fmt: skip
    title = ("PTQ of the tiny DiTs (random weights; 8 calibration samples, 4 steps, 20 iterations): model and "
             "per-layer SQNR")  # fmt: skip
    write_report(rows, a.out, "dit_ptq_sqnr", title, columns)


if __name__ == "__main__":
    main()
