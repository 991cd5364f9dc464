"""`quantune quantize` smoke test on zoo:tiny, `quantune generate` on its output, and bad input: one line, exit 2,
no output folder left behind."""

from __future__ import annotations

import pytest
from PIL import Image

from quantune.cli import main

SMALL = ["--calib-samples", "8", "--steps", "4", "--iters", "5", "--batch-size", "8", "--resolution", "16"]


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_quantize_then_generate(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# calibration prompts\ncat face\n\nred apple\n")
    out = tmp_path / "int8"
    rc, stdout, err = _run(capsys, "quantize", "--model", "zoo:tiny", "--method", "eda-dm", "--prompts", prompts,
                           *SMALL, "--out", out)  # fmt: skip
    assert rc == 0, err
    assert "eda-dm W8A8: 83 layers" in stdout and ("82 int8 (onednn)" in stdout or "82 int8 (int_mm)" in stdout)
    assert "unet weights on disk" in stdout and "x smaller" in stdout
    assert (out / "model_index.json").is_file() and (out / "quantune_ptq.json").is_file()
    rc, stdout, err = _run(capsys, "generate", "--model", out, "--prompt", "cat face", "--steps", "2", "--size", "32",
                           "--out", tmp_path / "gen")  # fmt: skip
    assert rc == 0, err
    assert Image.open(tmp_path / "gen" / "grid.png").size == (32, 32)


def _leftovers(tmp_path, name: str) -> list[str]:
    return [p.name for p in tmp_path.iterdir() if p.name.startswith(name) or p.name.startswith(f".{name}")]


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--wbits", "9"], "wbits"),
        (["--abits", "3"], "abits"),
        (["--calib-samples", "4", "--steps", "8"], "fewer than the 8 sampler steps"),
    ],
)
def test_bad_settings(tmp_path, capsys, argv, match):
    rc, _, err = _run(capsys, "quantize", "--model", "zoo:tiny", *argv, "--out", tmp_path / "out")
    assert rc == 2 and match in err and len(err.strip().splitlines()) == 1
    assert _leftovers(tmp_path, "out") == []


def test_not_a_pipeline_folder(tmp_path, capsys):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"junk")
    rc, _, err = _run(capsys, "quantize", "--model", tmp_path / "weights", *SMALL, "--out", tmp_path / "out")
    assert rc == 2 and "not a diffusers pipeline folder" in err
    assert _leftovers(tmp_path, "out") == []


def test_interrupted_quantize_leaves_nothing(tmp_path, capsys, monkeypatch):
    import quantune.models.integer as integer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(integer, "write_spec", interrupted)  # Ctrl-C while the integer model is being written
    rc, _, err = _run(capsys, "quantize", "--model", "zoo:tiny", "--method", "minmax", *SMALL, "--out",
                      tmp_path / "out")  # fmt: skip
    assert rc == 130 and "no partial output" in err
    assert _leftovers(tmp_path, "out") == []


def test_missing_prompts_file(tmp_path, capsys):
    rc, _, err = _run(capsys, "quantize", "--model", "zoo:tiny", "--prompts", tmp_path / "nope.txt", "--out",
                      tmp_path / "out")  # fmt: skip
    assert rc == 2 and "cannot read the prompts file" in err
