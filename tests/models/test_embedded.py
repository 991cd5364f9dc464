"""`quantune lora embed`: a pipeline folder with the adapter in place for every adapter type. load_pipeline loads it
wrapped (equal to applying the file), the strength is adjustable, `lora extract` gives the adapter back exactly,
`quantune train` continues training it, and diffusers reads the folder as the base model."""

from __future__ import annotations

import json

import pytest
import torch

from quantune.cli import main
from quantune.formats import read_lora, write_lora
from quantune.lora import LoraConfig, add_lora, get_lora_weights, lora_layers, set_lora_multiplier
from quantune.lora.inject import remove_lora
from quantune.models import load_pipeline
from tests.conftest import pipe_outputs
from tests.lora.test_lycoris import _perturb

KINDS = {"lora": {}, "loha": {"type": "loha"}, "lokr": {"type": "lokr", "r": 2}, "dora": {"type": "dora"}}


def _adapter_file(tiny, kind, path):
    options = {"r": 4, **KINDS[kind]}
    add_lora(tiny.unet, LoraConfig(alpha=2.0, targets=r".*(to_q|to_v|proj_in|conv1)", seed=0, **options))
    _perturb(tiny.unet, 0)
    with_adapter = pipe_outputs(tiny)[1]
    file = write_lora(get_lora_weights(tiny), path, "quantune")
    remove_lora(tiny.unet)
    return file, with_adapter


@pytest.mark.parametrize("kind", KINDS)
def test_embed_loads_with_the_adapter_in_place_and_extracts_exactly(kind, tiny, tmp_path, capsys):
    file, expected = _adapter_file(tiny, kind, tmp_path / "a.safetensors")
    out = tmp_path / "embedded"
    rc = main(["lora", "embed", "--model", "zoo:tiny", "--lora", f"{file}:1.0", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    pipe = load_pipeline(str(out))
    assert lora_layers(pipe.unet) and not any(m.merged for m in lora_layers(pipe.unet).values())
    torch.testing.assert_close(pipe_outputs(pipe)[1], expected, atol=1e-5, rtol=0)
    set_lora_multiplier(pipe.unet, 0.0)  # the strength is the user's: at 0 the base model
    torch.testing.assert_close(pipe_outputs(pipe)[1], pipe_outputs(tiny)[1], atol=1e-5, rtol=0)
    rc = main(["lora", "extract", "--tuned", str(out), "--out", str(tmp_path / "back.safetensors")])
    assert rc == 0, capsys.readouterr().err
    back, original = read_lora(tmp_path / "back.safetensors")[0], read_lora(file)[0]
    assert set(back) == set(original)
    for key, mod in original.items():
        assert all(torch.equal(a, b) for a, b in zip(back[key].tensors(), mod.tensors())), key


def test_diffusers_reads_the_base_and_training_continues(tiny, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    from quantune.train.trainer import train
    from tests.train.test_trainer import _cfg

    file, _ = _adapter_file(tiny, "loha", tmp_path / "a.safetensors")
    out = tmp_path / "embedded"
    assert main(["lora", "embed", "--model", "zoo:tiny", "--lora", f"{file}:0.7", "--out", str(out)]) == 0
    assert json.loads((out / "quantune_adapter.json").read_text())["strength"] == 0.7
    assert {layer.multiplier for layer in lora_layers(load_pipeline(str(out)).unet).values()} == {0.7}
    base = StableDiffusionPipeline.from_pretrained(str(out))  # diffusers: the base model, files ignored
    torch.testing.assert_close(pipe_outputs(base)[1], pipe_outputs(tiny)[1], atol=1e-6, rtol=0)
    run = tmp_path / "run"
    steps = ["train.steps=2", "log.checkpoint_every=0", "log.validation_every=0", "optim.lr=1e-2"]
    train(_cfg(run, *steps, f"model.pretrained={out}", "lora.text_encoder=false"))
    trained, start = read_lora(run / "lora.safetensors")[0], read_lora(file)[0]
    assert set(trained) == set(start) and {m.kind for m in trained.values()} == {"loha"}  # the same adapter
    assert any(not torch.equal(trained[k].parts["hada_w2_a"], start[k].parts["hada_w2_a"]) for k in start)


def test_extract_without_base_needs_an_embed_folder(capsys):
    rc = main(["lora", "extract", "--tuned", "zoo:tiny", "--rank", "2", "--out", "/tmp/never.safetensors"])
    assert rc == 2 and "--base" in capsys.readouterr().err
