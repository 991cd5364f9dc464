"""PTQ end to end on zoo:tiny (few samples and iterations): each method, the integer kernels against fake
quantization, save / load of the integer model, UNet2DModel pipelines, and the errors of bad input."""

from __future__ import annotations

import pytest
import torch

from quantune.errors import QuantuneError
from quantune.ptq import PTQConfig, quantize_pipeline, save_ptq_pipeline
from quantune.quant.kernels import drop_int_kernels, prepare_int_kernels
from quantune.quant.primitives import sqnr_db
from quantune.quant.quantize import quant_layers

SMALL = dict(calib_samples=8, steps=4, iters=20, batch_size=8, resolution=16)  # 8x8 latents: seconds per method


def _probe(pipe):
    """Fixed UNet inputs at several timesteps, with and without a prompt."""
    from quantune.train.objective import encode_prompts

    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ehs = encode_prompts(pipe, ["cat face", "red apple", "", ""])
    return x, torch.tensor([900, 500, 100, 10]), ehs


def _out(pipe, probe):
    with torch.no_grad():
        return pipe.unet(*probe).sample


@pytest.mark.parametrize("method", ["minmax", "qdiffusion", "eda-dm", "eda-dm-reference"])
def test_method_w8a8_end_to_end(tiny, method):
    probe = _probe(tiny)
    fp = _out(tiny, probe)
    report = quantize_pipeline(tiny, PTQConfig(method=method, **SMALL), progress=False)
    assert report["layers"] == len(quant_layers(tiny.unet)) == 83
    assert report["shortcut_splits"] == 4 and report["calib_rows"] == 16  # 8 samples x (uncond, cond)
    assert sum(report["samples_per_step"]) == 8
    split = [m for m in quant_layers(tiny.unet).values() if m.act_quant is not None and m.act_quant.split]
    assert len(split) == 4  # the up-block shortcut convs: input split in two parts, and the weight too in the preset
    assert all(m.weight_split == (m.act_quant.split if method == "eda-dm-reference" else 0) for m in split)
    if method.startswith("eda-dm"):
        assert report["samples_per_step"] != [2, 2, 2, 2] and len(report["losses"]) == report["units"]
    else:
        assert report["samples_per_step"] == [2, 2, 2, 2]  # uniform calibration
    fake = _out(tiny, probe)
    assert sqnr_db(fp, fake) > 20  # measured 28-29 dB on this random-weight model
    ways = prepare_int_kernels(tiny.unet)
    assert sum(n for k, n in ways.items() if k.startswith("int8")) == 82  # all but conv_out (float input)
    integer = _out(tiny, probe)
    assert sqnr_db(fake, integer) > 25  # code flips at rounding boundaries propagate; measured 35-60 dB


def test_weight_only_w4a16(tiny):
    probe = _probe(tiny)
    fp = _out(tiny, probe)
    report = quantize_pipeline(tiny, PTQConfig(method="minmax", wbits=4, abits=None, **SMALL), progress=False)
    assert report["attn_bits"] is None
    assert prepare_int_kernels(tiny.unet) == {"dequantized (weight-only)": 83}
    assert sqnr_db(fp, _out(tiny, probe)) > 10  # W4 min-max, round to nearest, random weights


@pytest.mark.parametrize("method", ["eda-dm", "eda-dm-reference"])  # the reference: split weight grids saved too
def test_w4a8_save_load_round_trip(tiny, tmp_path, method):
    import quantune

    probe = _probe(tiny)
    report = quantize_pipeline(tiny, PTQConfig(method=method, wbits=4, **SMALL), progress=False)
    out = save_ptq_pipeline(tiny, tmp_path / "int", report)
    assert (out / "quantune_ptq.json").is_file() and (out / "unet" / "quantune_quant.json").is_file()
    prepare_int_kernels(tiny.unet)
    expected = _out(tiny, probe)
    loaded = quantune.load_pipeline(str(out), backend="torch")  # PyTorch's kernels (OpenVINO: test_ov_runtime)
    layers = quant_layers(loaded.unet)
    assert len(layers) == 83 and all(layer.kernel is not None or layer.act_quant is None or
                                     layer.act_quant.split for layer in layers.values())  # fmt: skip
    packed = [n for n, layer in layers.items() if layer.packed]
    assert len(packed) == 81  # int4 packed two per byte; time_embedding.linear_1 and conv_out stay 8-bit
    state = loaded.unet.state_dict()
    assert not any(k == f"{n}.weight" for n in layers for k in state)  # no float copy of quantized weights
    torch.testing.assert_close(_out(loaded, probe), expected, rtol=0, atol=1e-5)
    drop_int_kernels(loaded.unet)
    fp32 = report["fp32_unet_bytes"]
    on_disk = sum(p.stat().st_size for p in (out / "unet").glob("*.safetensors"))
    assert on_disk < fp32 / 4  # W4: well under a quarter of fp32 (norms and biases stay float)


def test_unet2dmodel_pipeline(tmp_path):
    """An unconditional DDPM-style pipeline (UNet2DModel with attention) quantizes, saves and loads."""
    from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel

    import quantune

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    )  # fmt: skip
    pipe = DDPMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([700, 50])
    with torch.no_grad():
        fp = unet(x, t).sample
    cfg = PTQConfig(method="eda-dm", calib_samples=8, steps=4, iters=10, batch_size=8)
    report = quantize_pipeline(pipe, cfg, progress=False)
    assert report["calib_rows"] == 8 and report["shortcut_splits"] > 0
    with torch.no_grad():
        fake = pipe.unet(x, t).sample
    assert sqnr_db(fp, fake) > 20
    out = save_ptq_pipeline(pipe, tmp_path / "ddpm-int", report)
    loaded = quantune.load_pipeline(str(out), backend="torch")
    assert type(loaded.unet).__name__ == "UNet2DModel" and len(quant_layers(loaded.unet)) == report["layers"]
    drop_int_kernels(loaded.unet)
    with torch.no_grad():
        torch.testing.assert_close(loaded.unet(x, t).sample, fake, rtol=0, atol=1e-5)


def test_unsupported_module_is_named(tiny):
    tiny.unet.down_blocks[0].extra = torch.nn.Conv1d(4, 4, 3)  # a parameterised leaf the PTQ cannot quantize
    with pytest.raises(QuantuneError, match=r"down_blocks\.0\.extra is a Conv1d.*--keep-fp"):
        quantize_pipeline(tiny, PTQConfig(method="minmax", **SMALL), progress=False)
    quantize_pipeline(tiny, PTQConfig(method="minmax", keep_fp=[r"down_blocks\.0\.extra"], **SMALL), progress=False)


def test_nan_calibration_is_an_error(tiny):
    with torch.no_grad():
        tiny.unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(QuantuneError, match="NaN/inf"):
        quantize_pipeline(tiny, PTQConfig(method="minmax", **SMALL), progress=False)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(wbits=9), "wbits"),
        (dict(wbits=1), "wbits"),
        (dict(abits=3), "abits"),
        (dict(calib_samples=10, steps=20), "fewer than the 20 sampler steps"),
        (dict(method="gptq"), "choose one of minmax, qdiffusion, eda-dm"),
        (dict(qdrop=1.0), "qdrop"),
        (dict(resolution=20), "multiple of 8"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(QuantuneError, match=match):
        PTQConfig(**kwargs)


def test_multistep_scheduler_and_shuffled_steps(tiny):
    """PNDM calls the UNet steps + 1 times: each call is a calibration step; samples come in random step order."""
    from diffusers import PNDMScheduler

    from quantune.ptq.calib import collect_calibration
    from quantune.ptq.run import default_prompts

    tiny.scheduler = PNDMScheduler.from_config(tiny.scheduler.config, skip_prk_steps=True)
    cfg = PTQConfig(method="qdiffusion", **{**SMALL, "calib_samples": 10})
    calib, _ = collect_calibration(tiny, cfg, default_prompts(16))
    assert len(calib.counts) == 5 and sum(calib.counts) == 10  # 4 steps, 5 UNet calls
    t = calib.kwargs()["timestep"].reshape(-1)[::2]  # one timestep per sample (its two guidance rows)
    assert sorted(t.tolist()) != t.tolist() and sorted(t.tolist(), reverse=True) != t.tolist()
