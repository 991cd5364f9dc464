"""CLI smoke tests on zoo:tiny (64 px, 2 steps): every command of the contract, and bad input -> one line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from quantune.cli import main


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _generate(capsys, out: Path, *extra: str) -> int:
    """`quantune generate` on zoo:tiny, 2 steps, 2 images of "red apple"."""
    argv = ["generate", "--model", "zoo:tiny", *extra, "--prompt", "red apple", "--steps", "2", "--num-images", "2"]
    return _run(capsys, *argv, "--out", out)[0]


def test_generate_scale_grid(lora_file, tmp_path, capsys):
    assert _generate(capsys, tmp_path / "gen", "--lora", f"{lora_file}:0,1") == 0
    names = sorted(p.name for p in (tmp_path / "gen").iterdir())
    assert names == ["grid.png", "scale0_seed0.png", "scale0_seed1.png", "scale1_seed0.png", "scale1_seed1.png"]
    assert Image.open(tmp_path / "gen" / "grid.png").size == (128, 128)  # 2 columns x 2 rows of 64 px
    # the seed is fixed across rows, so only the LoRA strength differs between row 0 and row 1
    row0 = Image.open(tmp_path / "gen" / "scale0_seed0.png").tobytes()
    assert row0 != Image.open(tmp_path / "gen" / "scale1_seed0.png").tobytes()
    rc = _generate(capsys, tmp_path / "plain")
    assert rc == 0 and Image.open(tmp_path / "plain" / "seed0.png").tobytes() == row0  # strength 0 == no LoRA


def test_inspect(lora_file, capsys):
    rc, out, _ = _run(capsys, "lora", "inspect", lora_file, "--json")
    info = json.loads(out)
    assert rc == 0 and info["format"] == "quantune" and info["modules"] == 52
    assert info["components"] == {"unet": 44, "text_encoder": 8} and info["dtype"] == "float32"
    rc, out, _ = _run(capsys, "lora", "inspect", lora_file)
    assert "quantune LoRA" in out and "ranks" in out


def test_convert_every_way(lora_file, tmp_path, capsys):
    src = lora_file
    for fmt in ("diffusers", "peft", "kohya", "quantune"):
        out = tmp_path / (fmt if fmt == "peft" else f"{fmt}.safetensors")
        rc, text, err = _run(capsys, "lora", "convert", src, "--to", fmt, "--out", out, "--model", "zoo:tiny")
        assert rc == 0, err
        assert f"-> {fmt}" in text
        src = out
    rc, out, _ = _run(capsys, "lora", "inspect", src, "--json")
    assert json.loads(out)["modules"] == 52


def test_merge_writes_a_loadable_diffusers_folder(lora_file, tmp_path, capsys):
    rc, out, err = _run(
        capsys, "lora", "merge", "--model", "zoo:tiny", "--lora", f"{lora_file}:0.8", "--out", tmp_path / "merged"
    )
    assert rc == 0, err
    from diffusers import StableDiffusionPipeline

    from quantune.models import load_pipeline

    assert isinstance(load_pipeline(str(tmp_path / "merged")), StableDiffusionPipeline)
    StableDiffusionPipeline.from_pretrained(tmp_path / "merged")  # diffusers loads it too
    again = ["lora", "merge", "--model", "zoo:tiny", "--lora", f"{lora_file}:0.8", "--out", tmp_path / "merged"]
    rc, _, err = _run(capsys, *again)
    assert rc == 2 and "--overwrite" in err  # never replaced silently
    rc, _, err = _run(capsys, *again, "--overwrite")
    assert rc == 0, err  # a previous merge output is replaced when the user says so
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    rc, _, err = _run(
        capsys, "lora", "merge", "--model", "zoo:tiny", "--lora", str(lora_file), "--out", tmp_path / "mine",
        "--overwrite",
    )  # fmt: skip
    assert rc == 2 and "other files" in err and (tmp_path / "mine" / "notes.txt").exists()  # not even then


def test_mix_and_extract(lora_file, tmp_path, capsys):
    for mode, extra in (("sum", []), ("concat", []), ("svd", ["--rank", "3"])):
        rc, out, err = _run(
            capsys,
            "lora",
            "mix",
            f"{lora_file}:0.5",
            f"{lora_file}:0.5",
            "--mode",
            mode,
            *extra,
            "--out",
            tmp_path / f"{mode}.safetensors",
        )
        assert rc == 0, err
    assert "relative error" in out
    rc, _, _ = _run(
        capsys, "lora", "merge", "--model", "zoo:tiny", "--lora", str(lora_file), "--out", tmp_path / "tuned"
    )
    rc, out, err = _run(
        capsys,
        "lora",
        "extract",
        "--base",
        "zoo:tiny",
        "--tuned",
        tmp_path / "tuned",
        "--rank",
        "4",
        "--clamp-quantile",
        "1",
        "--out",
        tmp_path / "ex.safetensors",
    )
    assert rc == 0, err
    assert "extracted 52 modules" in out


@pytest.mark.parametrize(
    "argv,match",
    [
        (["lora", "inspect", "missing.safetensors"], "no such file"),
        (["lora", "convert", "missing.safetensors", "--to", "kohya", "--out", "x.safetensors"], "no such file"),
        (["generate", "--model", "zoo:nothing", "--prompt", "x", "--out", "o"], "zoo:tiny"),
        (["lora", "mix", "a.safetensors:1", "--mode", "svd", "--out", "m.safetensors"], "--rank"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if argv[1] == "mix":
        (tmp_path / "a.safetensors").write_bytes(b"junk")
    rc, out, err = _run(capsys, *argv)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and (match in lines[0] or "not a readable" in lines[0])
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "m.safetensors").exists()


def test_console_entry_point_runs():
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    done = subprocess.run([sys.executable, "-m", "quantune", "--help"], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "generate" in done.stdout and "lora" in done.stdout


@pytest.mark.parametrize("spec", ["FILE:nan", "FILE:inf", "FILE:-inf", "FILE:abc", "FILE:0,nan"])
@pytest.mark.parametrize("command", ["generate", "mix"])
def test_lora_strengths_must_be_finite_numbers(spec, command, lora_file, capsys, tmp_path):
    arg = spec.replace("FILE", str(lora_file))
    if command == "generate":
        argv = ["generate", "--model", "zoo:tiny", "--lora", arg, "--prompt", "x", "--out", tmp_path / "o"]
    else:
        argv = ["lora", "mix", arg, f"{lora_file}:0.5", "--mode", "concat", "--out", tmp_path / "m.safetensors"]
    rc, _, err = _run(capsys, *argv)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:")
    assert "strength" in lines[0] and "no such file" not in lines[0]
    assert not (tmp_path / "o").exists() and not (tmp_path / "m.safetensors").exists()


def test_the_cli_offers_every_writable_lora_format():
    from quantune.cli_args import LORA_FORMATS
    from quantune.formats import WRITABLE

    assert LORA_FORMATS == WRITABLE


def test_generate_says_which_backend_runs_an_integer_model(tmp_path, capsys, monkeypatch):
    from quantune.quant.ov_export import openvino_missing

    rc, out, err = _run(capsys, "quantize", "--model", "zoo:tiny", "--method", "minmax", "--calib-samples", "4",
                        "--steps", "2", "--resolution", "16", "--out", tmp_path / "int")  # fmt: skip
    assert rc == 0, err
    argv = ["generate", "--model", tmp_path / "int", "--prompt", "red apple", "--steps", "2", "--size", "32"]
    rc, out, err = _run(capsys, *argv, "--backend", "torch", "--out", tmp_path / "torch")
    assert rc == 0 and "denoiser: PyTorch integer kernels" in out, err
    if openvino_missing() is None:
        rc, out, err = _run(capsys, *argv, "--out", tmp_path / "auto")  # auto: OpenVINO on the CPU
        assert rc == 0 and "denoiser: OpenVINO (quantune's integers and scales)" in out, err
    monkeypatch.setattr("quantune.models.deploy.openvino_missing", lambda: "OpenVINO is not installed (pip ...)")
    rc, out, err = _run(capsys, *argv, "--backend", "openvino", "--out", tmp_path / "ov")
    assert rc == 2 and err.count("\n") == 1 and "--backend openvino: OpenVINO is not installed" in err
    assert not (tmp_path / "ov").exists()
    rc, out, err = _run(capsys, *argv, "--out", tmp_path / "fallback")  # auto without OpenVINO: PyTorch, said
    assert rc == 0 and "denoiser: PyTorch integer kernels" in out, err


@pytest.fixture
def loha_file(tiny, tmp_path):
    """zoo:tiny's UNet attention + 3x3 conv1 with a trained-looking LoHa (DoRA on top), as a kohya file."""
    from quantune.formats import write_lora
    from quantune.lora import LoraConfig, add_lora, get_lora_weights
    from tests.lora.test_lycoris import _perturb

    add_lora(tiny.unet, LoraConfig(type="loha", dora=True, r=4, targets=r".*(to_q|to_v|conv1)", seed=0))
    _perturb(tiny.unet, 0)
    return write_lora(get_lora_weights(tiny), tmp_path / "loha.safetensors", "kohya", pipe=tiny)


def test_lycoris_files_through_every_command(loha_file, tmp_path, capsys):
    rc, out, err = _run(capsys, "lora", "inspect", loha_file, "--json", "--model", "zoo:tiny")
    info = json.loads(out)
    assert rc == 0 and info["format"] == "kohya" and info["adapter_types"] == {"loha+dora": info["modules"]}, err
    assert info["factors"]["loha+dora"] == ["dora_scale", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
    assert info["layer_kinds"]["conv"] > 0  # the 3x3 convs, their kernel known from --model
    rc, _, err = _run(capsys, "lora", "convert", loha_file, "--to", "comfyui", "--model", "zoo:tiny", "--out",
                      tmp_path / "comfy.safetensors")  # fmt: skip
    assert rc == 0, err
    rc, _, err = _run(capsys, "lora", "merge", "--model", "zoo:tiny", "--lora", f"{loha_file}:0.5", "--out",
                      tmp_path / "merged")  # fmt: skip
    assert rc == 0, err
    rc, _, err = _run(capsys, "lora", "mix", f"{loha_file}:1", f"{loha_file}:1", "--mode", "concat", "--out",
                      tmp_path / "mix.safetensors")  # fmt: skip
    assert rc == 2 and err.startswith("error:") and "cannot be mixed" in err  # DoRA: W' - W needs W
    rc, _, err = _run(capsys, "lora", "convert", loha_file, "--to", "diffusers", "--model", "zoo:tiny", "--out",
                      tmp_path / "d.safetensors")  # fmt: skip
    assert rc == 2 and "no peft / diffusers form" in err and not (tmp_path / "d.safetensors").exists()
    assert _generate(capsys, tmp_path / "gen", "--lora", f"{loha_file}:0,1") == 0
    row0, row1 = (Image.open(tmp_path / "gen" / f"scale{s}_seed0.png").tobytes() for s in (0, 1))
    assert row0 != row1


def test_generate_sums_several_lycoris_files_and_refuses_them_on_integer_models(loha_file, tmp_path, capsys):
    assert _generate(capsys, tmp_path / "two", "--lora", f"{loha_file}:0.5", "--lora", f"{loha_file}:0.5") == 0
    assert _generate(capsys, tmp_path / "one", "--lora", f"{loha_file}:1") == 0
    assert _generate(capsys, tmp_path / "none") == 0
    two, one, none = (np.asarray(Image.open(tmp_path / d / "seed0.png"), dtype=float) for d in ("two", "one", "none"))
    assert np.abs(two - one).max() <= 3 < np.abs(one - none).max()  # merged 0.5 + 0.5 of W' - W = applied at 1
    rc, _, err = _run(capsys, "quantize", "--model", "zoo:tiny", "--method", "minmax", "--calib-samples", "4",
                      "--steps", "2", "--resolution", "16", "--out", tmp_path / "int")  # fmt: skip
    assert rc == 0, err
    argv = ["generate", "--model", tmp_path / "int", "--prompt", "x", "--steps", "1", "--size", "32", "--backend",
            "torch", "--lora", f"{loha_file}:0.5", "--lora", f"{loha_file}:0.5", "--out", tmp_path / "g"]  # fmt: skip
    rc, _, err = _run(capsys, *argv)
    assert rc == 2 and "re-quantized" in err and not (tmp_path / "g").exists()
