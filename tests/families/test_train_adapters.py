"""`quantune train` with the LyCORIS adapter types and DoRA (`lora.type`) on the tiny UNet and a tiny DiT: every
adapted module learns, the exports are the ones their loaders read (diffusers for DoRA, kohya for LoHa / LoKr), a
QDoRA run merges into an integer model, and IntLoRA refuses the other types by name."""

from __future__ import annotations

import pytest

from quantune.cli import main
from quantune.errors import QuantuneError
from quantune.families import family_of
from quantune.formats import read_lora
from quantune.models import load_pipeline
from quantune.train.trainer import train
from tests.families.test_train import STEPS
from tests.train.test_trainer import _cfg

KINDS = ["loha", "lokr", "dora"]
KOHYA, PEFT, DIFFUSERS = ("lora_kohya.safetensors", "kohya"), ("peft", "peft"), ("pytorch_lora_weights.safetensors",
                                                                              "diffusers")  # fmt: skip
EXPORT = {
    ("loha", "zoo:tiny"): KOHYA,
    ("lokr", "zoo:tiny"): KOHYA,
    ("dora", "zoo:tiny"): DIFFUSERS,
    ("loha", "zoo:tiny-flux"): PEFT,
    ("lokr", "zoo:tiny-flux"): PEFT,
    ("dora", "zoo:tiny-flux"): DIFFUSERS,
}
# FLUX's kohya names fuse q / k / v: a LoHa / LoKr there goes to peft  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ref", ["zoo:tiny", "zoo:tiny-flux"])
def test_adapter_types_train_and_export(kind, ref, tmp_path):
    result = train(_cfg(tmp_path, *STEPS, f"model.pretrained={ref}", "method=lora", f"lora.type={kind}"))
    assert result.final_loss == result.final_loss
    pipe = load_pipeline(ref)
    family = family_of(pipe)
    weights, fmt, _ = read_lora(tmp_path / "lora.safetensors", pipe)
    denoiser = {k: m for k, m in weights.items() if k.startswith(family.denoiser + ".")}
    assert fmt == "quantune" and {m.kind for m in denoiser.values()} == {kind}  # text encoders: LoRA
    for key, mod in denoiser.items():  # every module moved off the base model
        w = family.denoiser_of(pipe).get_submodule(key.split(".", 1)[1]).weight.detach()
        assert mod.delta_for(w).abs().max() > 0, key
    name, export_fmt = EXPORT[(kind, ref)]
    exported, fmt, _ = read_lora(tmp_path / name, pipe)
    assert fmt == export_fmt and set(exported) == set(weights)
    if kind == "dora" and hasattr(pipe, "load_lora_weights"):
        pipe.load_lora_weights(str(tmp_path / name))  # diffusers' own loader (peft's use_dora)


def test_qdora_trains_on_an_integer_base_and_merges(tmp_path, capsys):
    run = tmp_path / "run"
    train(_cfg(run, *STEPS, "method=qlora", "lora.type=dora", "quant.bits=8", config="tiny_intlora.toml"))
    assert main(["qlora", "merge", str(run), "--out", str(tmp_path / "merged")]) == 0, capsys.readouterr().err
    merged = load_pipeline(str(tmp_path / "merged"), backend="torch")
    image = merged(["cat"], num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape[0] == 1 and (image == image).all()


@pytest.mark.parametrize("kind", KINDS)
def test_intlora_refuses_other_adapter_types(kind, tmp_path):
    with pytest.raises(QuantuneError, match="IntLoRA's integer merge is defined for LoRA"):
        train(_cfg(tmp_path, *STEPS, "method=intlora-mul", f"lora.type={kind}", config="tiny_intlora.toml"))


def test_lora_config_checks_the_type_options():
    from quantune.lora import LoraConfig

    with pytest.raises(QuantuneError, match="LoraConfig.type"):
        LoraConfig(type="boft")
    with pytest.raises(QuantuneError, match="LoRA options"):
        LoraConfig(type="loha", conv_mode="soft")
    with pytest.raises(QuantuneError, match="factor"):
        LoraConfig(type="lokr", factor=0)
    assert LoraConfig(type="dora").dora and LoraConfig(type="dora").type == "lora"
