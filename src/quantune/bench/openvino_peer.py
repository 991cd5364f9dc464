"""OpenVINO as a peer of the inference table: the float denoiser converted to OpenVINO IR (`openvino.convert_model`,
traced on one batch of its forward arguments), run as is ("openvino fp32"), after NNCF's post-training
quantization ("openvino INT8": `nncf.quantize` on the same calibration batches as every variant, model_type
TRANSFORMER, NNCF's defaults otherwise) or after NNCF's weight compression ("openvino INT4 weight-only":
`nncf.compress_weights` INT4_ASYM, one scale per output channel (group_size -1, like quantune's W4), every layer
(ratio 1, all_layers: NNCF's default keeps embeddings and the last MatMul in int8), no data;
NNCF compresses MatMuls to INT4 and keeps convolutions in its INT8 backup mode, so a UNet's convs stay 8-bit),
compiled for the CPU (OpenVINO runs on the CPU here; its GPU plugin is Intel's). The fp32 row asks for f32
inference precision; the quantized rows keep OpenVINO's default, which on a CPU with native bf16 (AVX512-BF16,
AMX) runs the ops NNCF left in float in bf16, the fastest a user gets.
The engine CPU users of diffusers pick (optimum-intel), so the one quantune's CPU speed is measured against.
Benchmark requirements only (benchmarks/requirements.txt), imported in the variant's own process.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn


class OpenVINODenoiser:
    """A compiled OpenVINO model called like the denoiser: `(**kwargs) -> prediction tensor` (its tensors in the
    order quant/ov_runtime.py's trace takes them)."""

    def __init__(self, compiled, model: nn.Module) -> None:
        self.compiled, self.model = compiled, model
        self.signature = inspect.signature(model.forward)

    def __call__(self, **kwargs) -> torch.Tensor:
        from quantune.quant.ov_runtime import flat_inputs

        inputs = [t.numpy() for t in flat_inputs(self.model, kwargs, self.signature)]
        return torch.from_numpy(self.compiled(inputs)[0].copy())


MODES = ("fp32", "int8", "int4")


def _compress(ov_model, mode: str, model: nn.Module, calib: list[dict]):
    """NNCF's INT8 post-training quantization or INT4 weight-only compression of `ov_model` (module docstring)."""
    import nncf

    from quantune.quant.ov_runtime import flat_inputs

    if mode == "int4":
        return nncf.compress_weights(
            ov_model, mode=nncf.CompressWeightsMode.INT4_ASYM, ratio=1.0, group_size=-1, all_layers=True
        )
    data = nncf.Dataset([tuple(t.numpy() for t in flat_inputs(model, b)) for b in calib])
    return nncf.quantize(ov_model, data, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib))


def openvino_variant(mode: str):
    """The inference table's `apply(model, calib)` for one OpenVINO peer: `mode` fp32, int8 or int4 (docstring)."""
    if mode not in MODES:
        raise ValueError(f"unknown OpenVINO peer mode {mode!r}: one of {MODES}")

    def apply(model: nn.Module, calib: list[dict]):
        import openvino as ov

        from quantune.quant.ov_runtime import _Traced, flat_inputs

        if next(model.parameters()).device.type != "cpu":
            raise ModuleNotFoundError("OpenVINO runs on the CPU here", name="openvino (CPU only)")
        with torch.no_grad():
            ov_model = ov.convert_model(
                _Traced(model, calib[0]).eval(), example_input=tuple(flat_inputs(model, calib[0]))
            )
        if mode != "fp32":
            ov_model = _compress(ov_model, mode, model, calib)
        config = {"INFERENCE_PRECISION_HINT": "f32"} if mode == "fp32" else {}  # else OpenVINO's defaults (docstring)
        return OpenVINODenoiser(ov.Core().compile_model(ov_model, "CPU", config), model)

    return apply


def nncf_converter(items: list[dict], smooth_quant: bool):
    """An OpenVINOModule converter (quant/ov_runtime.py) that quantizes the float model with NNCF on `items` (the
    denoiser's keyword arguments of calibration calls): `nncf.quantize` with its defaults, or with model_type
    TRANSFORMER (`smooth_quant`: its SmoothQuant pass and transformer ignored patterns). The trace follows the first
    item (dynamic shapes: NNCF's calibration batch and the pipeline's batch differ)."""

    def convert(model: nn.Module, bound: dict, leaves: list[torch.Tensor]):
        import nncf
        import openvino as ov

        from quantune.quant.ov_runtime import _Traced, flat_inputs

        example = dict(bound)
        example.update(items[0])
        traced = _Traced(model, example).eval()
        with torch.no_grad():
            ov_model = ov.convert_model(traced, example_input=tuple(flat_inputs(model, example)))
        data = nncf.Dataset([tuple(t.numpy() for t in flat_inputs(model, {**bound, **item})) for item in items])
        kind = {"model_type": nncf.ModelType.TRANSFORMER} if smooth_quant else {}
        return nncf.quantize(ov_model, data, subset_size=len(items), **kind), traced.output_type

    return convert
