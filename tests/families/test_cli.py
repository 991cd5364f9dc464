"""Every LoRA-toolkit command, generate, quantize and eval through the CLI on every family's tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from quantune.api import load_lora
from quantune.cli import main
from quantune.formats import write_lora
from quantune.lora import get_lora_weights
from quantune.models import load_pipeline
from tests.families.conftest import MODELS, family_outputs
from tests.families.test_train import _text_encoder_lora


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _loaded(ref: str, lora: Path):
    """A fresh pipeline with the LoRA file loaded by diffusers' own loader (quantune's where a pipeline has none)."""
    pipe = load_pipeline(ref)
    if hasattr(pipe, "load_lora_weights"):
        pipe.load_lora_weights(str(lora))
    else:
        load_lora(lora, into=pipe)
    return pipe


def test_lora_toolkit(family_lora_pipe, family_ref, tmp_path, capsys):
    weights = get_lora_weights(family_lora_pipe)
    lora = write_lora(weights, tmp_path / "lora.safetensors", "quantune")
    rc, out, err = _run(capsys, "lora", "inspect", lora, "--json")
    assert rc == 0 and json.loads(out)["modules"] == len(weights), err
    other = "diffusers" if family_ref == MODELS["pixart"] else "kohya"  # kohya sd-scripts has no PixArt names
    kohya = tmp_path / f"{other}.safetensors"
    rc, _, err = _run(capsys, "lora", "convert", lora, "--to", other, "--out", kohya, "--model", family_ref)
    assert rc == 0, err
    rc, _, err = _run(capsys, "lora", "merge", "--model", family_ref, "--lora", kohya, "--out", tmp_path / "merged")
    assert rc == 0, err
    merged = load_pipeline(str(tmp_path / "merged"))
    for a, b in zip(family_outputs(merged), family_outputs(family_lora_pipe)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)  # merged weights = wrapped model (fp32 sums)
    rc, out, err = _run(capsys, "lora", "extract", "--base", family_ref, "--tuned", tmp_path / "merged", "--rank",
                        "4", "--clamp-quantile", "1", "--out", tmp_path / "ex.safetensors")  # fmt: skip
    assert rc == 0 and f"extracted {len(weights)} modules" in out, err
    comfy = tmp_path / "comfy.safetensors"
    rc, _, err = _run(capsys, "lora", "convert", kohya, "--to", "comfyui", "--out", comfy, "--model", family_ref)
    assert rc == 0, err
    rc, out, err = _run(capsys, "lora", "inspect", comfy, "--json", "--model", family_ref)
    assert rc == 0 and json.loads(out)["format"] == "comfyui", err
    rc, _, err = _run(capsys, "lora", "mix", f"{lora}:0.5", f"{comfy}:0.5", "--mode", "concat", "--to", "diffusers",
                      "--model", family_ref, "--out", tmp_path / "mix.safetensors")  # fmt: skip
    assert rc == 0, err
    fresh = _loaded(family_ref, tmp_path / "mix.safetensors")  # the mix of two halves is the LoRA again
    for a, b in zip(family_outputs(fresh), family_outputs(family_lora_pipe)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_generate_quantize_eval(family_lora_pipe, family_ref, tmp_path, capsys):
    lora = write_lora(get_lora_weights(family_lora_pipe), tmp_path / "lora.safetensors", "quantune")
    rc, _, err = _run(capsys, "generate", "--model", family_ref, "--lora", f"{lora}:0,1", "--prompt", "red apple",
                      "--steps", "2", "--size", "32", "--out", tmp_path / "gen")  # fmt: skip
    assert rc == 0 and (tmp_path / "gen" / "grid.png").is_file(), err
    rc, out, err = _run(capsys, "quantize", "--model", family_ref, "--method", "minmax", "--calib-samples", "4",
                        "--steps", "2", "--resolution", "16", "--out", tmp_path / "int")  # fmt: skip
    assert rc == 0 and "layers" in out, err
    rc, _, err = _run(capsys, "eval", "--model", tmp_path / "int", "--compare-model", family_ref, "--metrics",
                      "psnr,ssim", "--n", "2", "--steps", "2", "--size", "32", "--out", tmp_path / "ev")  # fmt: skip
    assert rc == 0, err


def test_train_from_a_pipeline_folder(family_ref, tmp_path, capsys):
    """A family's pipeline saved as a diffusers folder trains like the zoo model (SDXL died in get_aug_embed)."""
    load_pipeline(family_ref).save_pretrained(tmp_path / "model")
    sets = [f"model.pretrained={tmp_path / 'model'}", f"output_dir={tmp_path / 'run'}", "train.steps=2",
            "log.tensorboard=false", "log.checkpoint_every=0", "log.validation_every=0", "log.validation_steps=2",
            "log.validation_images=1", _text_encoder_lora(family_ref)]  # fmt: skip
    config = Path(__file__).parents[2] / "configs" / "tiny_lora.toml"
    rc, _, err = _run(capsys, "train", config, *[f"--set={s}" for s in sets])
    assert rc == 0, err
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
