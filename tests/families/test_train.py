"""`quantune train` with every method on every family's tiny model (2 steps, denoiser + every text encoder), the
exports the real loaders read, and the integer merges of the quantized methods equal to the training forward
(exactly for IntLoRA, within re-quantization for QLoRA)."""

from __future__ import annotations

import pytest
import torch

from quantune.cli import main
from quantune.families import family_of
from quantune.formats import read_lora
from quantune.models import load_pipeline
from quantune.quant.primitives import sqnr_db
from quantune.train.merge_run import load_run
from quantune.train.trainer import train
from tests.families.conftest import family_outputs
from tests.train.test_trainer import _cfg

STEPS = ["train.steps=2", "log.checkpoint_every=0", "log.validation_every=0", "optim.lr=1e-2"]


def _text_encoder_lora(ref: str) -> str:
    """lora.text_encoder=true where the family has a text encoder a LoRA may adapt (PixArt's only one is T5)."""
    pipe = load_pipeline(ref)
    return f"lora.text_encoder={str(bool(family_of(pipe).lora_text_encoders_of(pipe))).lower()}"


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_methods_train_every_text_encoder(family_ref, method, tmp_path):
    sets = [f"model.pretrained={family_ref}", f"method={method}", _text_encoder_lora(family_ref), "quant.act_bits=8"]
    result = train(_cfg(tmp_path, *STEPS, *sets))
    assert result.final_loss == result.final_loss
    pipe = load_pipeline(family_ref)
    family = family_of(pipe)
    weights, fmt, _ = read_lora(tmp_path / "pytorch_lora_weights.safetensors", pipe)
    assert fmt == "diffusers"
    components = {family.denoiser, *family.lora_text_encoders_of(pipe)}
    assert {k.split(".")[0] for k in weights} == components
    # every component learnt (B moved from 0); SDXL conditions on the penultimate CLIP layer, so the last layer
    # of its first text encoder gets no gradient, as in kohya's and diffusers' SDXL training
    assert {k.split(".")[0] for k, m in weights.items() if m.up.abs().max() > 0} == components
    if hasattr(pipe, "load_lora_weights"):  # the family's diffusers loader (PixArt has none)
        pipe.load_lora_weights(str(tmp_path / "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize(("method", "merge"), [("intlora-mul", "intlora"), ("intlora-shift", "intlora"),
                                               ("qlora", "qlora")])  # fmt: skip
def test_quantized_methods_merge_into_integer_models(family_ref, method, merge, tmp_path, capsys):
    run = tmp_path / "run"
    sets = [f"model.pretrained={family_ref}", f"method={method}", _text_encoder_lora(family_ref), "quant.act_bits=8"]
    # fp32 backward: with the bf16 backward that "auto" picks on AVX512-BF16 / AMX CPUs, the SD IntLoRA-MUL run's
    # merge differed from its training model's output (seen 2026-12-02 on an Intel Xeon with AMX; open. Suspected,
    # not verified: that adapter's U_int W_int fits int8, so the training model runs the step's int8 kernel while
    # the merged one is compared on float arithmetic, and one flipped activation rounding grows through the UNet)
    sets.append("quant.backward_dtype=fp32")
    bits = "quant.bits=8" if merge == "qlora" else "quant.bits=4"  # QLoRA re-quantizes: at 8 bits it stays close
    train(_cfg(run, *STEPS, *sets, bits, config="tiny_intlora.toml"))
    assert main([merge, "merge", str(run), "--out", str(tmp_path / "merged")]) == 0, capsys.readouterr().err
    merged = load_pipeline(str(tmp_path / "merged"), backend="torch")  # the integers' PyTorch arithmetic
    _, trained, _ = load_run(run, merge)
    from quantune.quant.kernels import drop_int_kernels

    drop_int_kernels(family_of(merged).denoiser_of(merged))  # the training's arithmetic on the stored integers
    states, after = family_outputs(merged)
    trained_states, before = family_outputs(trained)
    torch.testing.assert_close(states, trained_states, atol=1e-5, rtol=0)  # text-encoder LoRAs merged in float
    if merge == "intlora":
        assert torch.equal(after, before)  # IntLoRA's merge is the training weight, no PTQ
    else:
        assert sqnr_db(before, after) > 25.0  # dequantize + add + re-quantize at 8 bits
    kwargs = family_of(merged).call_kwargs(merged)
    image = merged(["cat"], num_inference_steps=2, height=32, width=32, output_type="np", **kwargs).images
    assert image.shape[0] == 1 and (image == image).all()


def test_full_finetune_trains_the_text_encoders(family_ref, tmp_path):
    text = _text_encoder_lora(family_ref).replace("lora.text_encoder", "train.train_text_encoder")
    sets = [f"model.pretrained={family_ref}", "method=full", "task=full", text]
    train(_cfg(tmp_path, *STEPS, *sets))
    tuned, base = load_pipeline(str(tmp_path / "pipeline")), load_pipeline(family_ref)
    family = family_of(base)
    a, b = family.denoiser_of(tuned).state_dict(), family.denoiser_of(base).state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the denoiser trained
    for name in family.lora_text_encoders_of(base):
        a, b = getattr(tuned, name).state_dict(), getattr(base, name).state_dict()
        assert any(not torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("model", ["zoo:tiny-xl", "zoo:tiny-flux"])
def test_two_processes_train_the_text_encoders(model, tmp_path):
    """DDP over the text encoders (SDXL; FLUX: CLIP beside a flow-matching transformer): SDXL's first encoder has
    a last layer its conditioning never reads, so the
    trainer asks DDP to look for parameters without gradients (else the second step fails)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from tests.train.test_trainer import FAST, ROOT, _env

    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("accelerate's launcher is not installed beside this python")
    sets = [f"output_dir={tmp_path}", *FAST, f"model.pretrained={model}", "train.steps=3", "log.checkpoint_every=0",
            "log.validation_every=0", "lora.text_encoder=true"]  # fmt: skip
    argv = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "quantune", "-v", "train",
            str(ROOT / "configs" / "tiny_lora.toml"), *[f"--set={s}" for s in sets]]  # fmt: skip
    done = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    digests = dict(re.findall(r"rank (\d)/2: trainable state sha256 (\w+)", done.stderr + done.stdout))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]
