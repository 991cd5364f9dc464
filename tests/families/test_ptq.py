"""Post-training quantization of every family's tiny model with each method (few samples and iterations): the
fake-quantized and the integer-kernel denoiser against the float one (SQNR), the integer folder saved and loaded
with identical outputs, and sampling from it."""

from __future__ import annotations

import pytest
import torch

from quantune.families import family_of
from quantune.models import load_pipeline
from quantune.models.deploy import backend_of
from quantune.ptq import PTQConfig, quantize_pipeline, save_ptq_pipeline
from quantune.quant.kernels import prepare_int_kernels
from quantune.quant.ov_export import openvino_missing
from quantune.quant.primitives import sqnr_db
from quantune.quant.quantize import quant_layers
from tests.families.conftest import MODELS, family_outputs

SMALL = dict(calib_samples=8, steps=4, iters=20, batch_size=8, resolution=16)


# minmax (calibration only, and the OpenVINO deployment) and eda-dm (TDAC + block reconstruction over the family's
# blocks) on every family; qdiffusion shares the reconstruction with eda-dm and differs only in a family-independent
# recipe, so it runs on one UNet and one transformer here (every method on zoo:tiny: tests/ptq/test_run.py).
CASES = [(name, method) for name in sorted(MODELS) for method in ("minmax", "eda-dm")]
CASES += [("sd", "qdiffusion"), ("flux", "qdiffusion")]


@pytest.mark.parametrize(("name", "method"), CASES)
def test_method_w8a8_save_load(name, method, tmp_path):
    pipe = load_pipeline(MODELS[name])
    denoiser = family_of(pipe).denoiser_of(pipe)
    fp = family_outputs(pipe)[1]
    report = quantize_pipeline(pipe, PTQConfig(method=method, **SMALL), progress=False)
    assert report["layers"] == len(quant_layers(denoiser)) > 20
    assert sum(report["samples_per_step"]) == 8
    assert sqnr_db(fp, family_outputs(pipe)[1]) > 20  # fake quantization; measured 26-45 dB on these random models
    out = save_ptq_pipeline(pipe, tmp_path / "int", report)
    prepare_int_kernels(denoiser)
    integer = family_outputs(pipe)[1]
    assert sqnr_db(fp, integer) > 20
    loaded = load_pipeline(str(out), backend="torch")
    torch.testing.assert_close(family_outputs(loaded)[1], integer, rtol=0, atol=1e-5)
    if method == "minmax" and openvino_missing() is None:  # the default CPU backend, once per family
        loaded = load_pipeline(str(out))
        assert backend_of(loaded) == "openvino"
        with torch.no_grad():
            deployed = family_outputs(loaded)[1]
        # same integers and scales; OpenVINO runs the float ops in bf16 on this CPU, code flips at rounding
        # boundaries propagate: measured 27-38 dB on these random models
        assert sqnr_db(integer, deployed) > 20
        assert family_of(loaded).denoiser_of(loaded).calls == {"openvino": 1, "torch": 0}  # no fallback
    kwargs = family_of(loaded).call_kwargs(loaded)
    with torch.no_grad():
        image = loaded(["cat"], num_inference_steps=2, height=32, width=32, output_type="np", **kwargs).images
    assert image.shape[0] == 1 and (image == image).all()
