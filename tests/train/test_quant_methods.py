"""qlora / intlora-mul / intlora-shift in the trainer on zoo:tiny: a few steps each, the integer merge through the
CLI equal to the training forward (exactly for IntLoRA), resume, mixed-precision casting, and the refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from quantune.cli import main
from quantune.errors import QuantuneError
from quantune.train.trainer import train
from tests.train.test_trainer import _cfg


def _unet_output(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    c = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), c).sample


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("intlora-mul", ["quant.bits=4", "quant.act_bits=8", "train.gradient_checkpointing=true"]),
        ("intlora-shift", ["quant.bits=8", "quant.act_bits=8", "quant.zero_fix='midrise'"]),
    ],
)
def test_intlora_trains_and_merges_exactly(tmp_path, capsys, method, extra):
    from quantune.models import load_pipeline
    from quantune.quant.kernels import drop_int_kernels
    from quantune.quant.layers import QuantConv2d, QuantLinear
    from quantune.quant.primitives import sqnr_db
    from quantune.train.merge_run import load_run

    run = tmp_path / "run"
    result = train(_cfg(run, f"method={method}", "train.steps=3", *extra, config="tiny_intlora.toml"))
    assert result.final_loss == result.final_loss
    assert (run / "adapter_state.safetensors").is_file() and (run / "intlora_int.safetensors").is_file()
    assert main(["intlora", "merge", str(run), "--out", str(tmp_path / "merged")]) == 0
    assert "merged 32 intlora layers" in capsys.readouterr().out
    merged = load_pipeline(str(tmp_path / "merged"), backend="torch")  # the integers' PyTorch arithmetic
    assert not any(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in merged.unet.modules())
    assert sum(isinstance(m, (QuantLinear, QuantConv2d)) for m in merged.unet.modules()) > 32
    _, trained, _ = load_run(run, "intlora")  # the training-time forward with the same adapter
    kernels = _unet_output(merged.unet)  # loading prepared the integer kernels (tests/quant/test_kernels.py)
    drop_int_kernels(merged.unet)  # the dequantized forward: the same integers, the training's arithmetic
    assert torch.equal(_unet_output(trained.unet), _unet_output(merged.unet))
    assert sqnr_db(_unet_output(merged.unet), kernels) > 25
    image = merged(["cat"], num_inference_steps=2, output_type="np").images
    assert image.shape[0] == 1 and (image == image).all()


def test_qlora_trains_and_merges_with_requantization(tmp_path, capsys):
    from quantune.models import load_pipeline
    from quantune.quant.primitives import sqnr_db
    from quantune.train.merge_run import load_run

    run = tmp_path / "run"
    train(_cfg(run, "train.steps=3", config="tiny_qlora.toml"))
    for name in ("adapter_state.safetensors", "lora.safetensors", "pytorch_lora_weights.safetensors"):
        assert (run / name).is_file()
    assert main(["qlora", "merge", str(run), "--out", str(tmp_path / "merged")]) == 0
    merged = load_pipeline(str(tmp_path / "merged"))
    _, trained, _ = load_run(run, "qlora")
    # dequantize + add + re-quantize at 8 bits: close to the training forward, not equal (that is the PTQ loss)
    assert sqnr_db(_unet_output(trained.unet), _unet_output(merged.unet)) > 25.0
    assert main(["intlora", "merge", str(run), "--out", str(tmp_path / "x")]) == 2
    assert "use `quantune qlora merge`" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_intlora_resume_continues_exactly(tmp_path):
    from safetensors.torch import load_file

    cfg = _cfg(
        tmp_path, "train.steps=4", "log.checkpoint_every=2", "train.deterministic=true", config="tiny_intlora.toml"
    )
    train(cfg)
    straight = load_file(str(tmp_path / "adapter_state.safetensors"))
    shutil.rmtree(tmp_path / "checkpoints" / "step-000004", ignore_errors=True)
    (tmp_path / "adapter_state.safetensors").unlink()
    train(cfg, resume="step-000002")
    resumed = load_file(str(tmp_path / "adapter_state.safetensors"))
    assert set(straight) == set(resumed) and any(".act_quant." in k for k in straight)
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_mixed_precision_cast_keeps_integer_layers_in_fp32():
    from quantune.models import build_tiny
    from quantune.train.config import resolve_config
    from quantune.train.registry import METHODS
    from quantune.train.trainer import _cast_frozen

    pipe = build_tiny()
    cfg = resolve_config(None, ["method=intlora-mul", "quant.quantize_rest=true"])
    METHODS["intlora-mul"]().prepare(pipe, cfg)
    _cast_frozen(pipe, "fp16")
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert layer.scale.dtype == torch.float32 and layer.lora_A.dtype == torch.float32
    assert pipe.unet.conv_in.scale.dtype == torch.float32
    assert pipe.unet.conv_norm_out.weight.dtype == torch.float16  # the float rest is halved


def test_activation_ranges_from_more_calibration_batches(tmp_path):
    """quant.calib_batches = N: the training-time input quantizers see the first N batches, each at its own
    timestep; 1 (the default, IntLoRA's reference) is the first batch only."""
    from safetensors.torch import load_file

    def ranges(n: int) -> dict[str, torch.Tensor]:
        run = tmp_path / f"calib{n}"
        train(_cfg(run, "train.steps=1", "quant.act_bits=8", f"quant.calib_batches={n}", config="tiny_qlora.toml"))
        return {k: v for k, v in load_file(run / "adapter_state.safetensors").items() if k.endswith("act_quant.scale")}

    one, four = ranges(1), ranges(4)
    assert len(one) > 30 and one.keys() == four.keys()
    changed = sum(not torch.equal(one[k], four[k]) for k in one)
    assert changed > 0.8 * len(one)  # every layer's input range is searched over the other batches' values too


def test_merge_refuses_other_runs(tmp_path, capsys):
    train(_cfg(tmp_path / "lora", "train.steps=1"))
    assert main(["intlora", "merge", str(tmp_path / "lora"), "--out", str(tmp_path / "m")]) == 2
    assert "method = 'lora'" in capsys.readouterr().err
    assert main(["qlora", "merge", str(tmp_path / "nothing"), "--out", str(tmp_path / "m")]) == 2
    assert "not a finished quantized training run" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("quant.bits=1", "quant.bits = 1 is not supported"),
        ("quant.zero_fix='x'", "quant.zero_fix"),
        ("quant.act_bits=20", "quant.act_bits = 20"),
        ("quant.calib_batches=0", "quant.calib_batches = 0"),
    ],
)
def test_bad_quant_config(override, match):
    from quantune.train.config import resolve_config

    with pytest.raises(QuantuneError, match=match):
        resolve_config(None, [override])


def test_quant_section_speaks_the_shared_vocabulary(tmp_path):
    """[quant] keeps its flat TOML keys; act_bits = 0 / lora_bits = 0 (older configs) still mean weight-only / U at
    the base's bits, read as None; `weight` / `act` are the quantization core's WeightQuant / ActQuant."""
    from quantune.quant.config import ActQuant, WeightQuant
    from quantune.train.config import config_from_dict, resolve_config

    old = tmp_path / "old.toml"
    old.write_text('method = "intlora-mul"\n[quant]\nbits = 4\nact_bits = 0\nlora_bits = 0\nsearch = "minmax"\n')
    q = resolve_config(old).quant
    assert q.act_bits is None and q.lora_bits is None and q.act is None
    assert q.weight == WeightQuant(4, search="minmax")
    cfg = resolve_config(None, ["quant.act_bits=8"])
    assert cfg.quant.act == ActQuant(8) and config_from_dict(cfg.to_dict()).quant == cfg.quant
    for name in ("tiny_intlora.toml", "tiny_qlora.toml"):
        assert resolve_config(Path(__file__).parents[2] / "configs" / name).quant.act == ActQuant(8)
