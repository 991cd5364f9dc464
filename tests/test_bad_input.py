"""Bad input over every command that writes: one `error:` line (the last line printed), exit 2, no traceback, nothing
new on disk and nothing of the user's replaced. A new writing command is covered by adding it to WRITERS."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from quantune.cli import _parser, main


@dataclass(frozen=True)
class Writer:
    """A command line writing OUT; `folder`: OUT is a folder; `marker`: a file a previous output of it holds."""

    argv: tuple[str, ...]
    folder: bool = True
    marker: str = "model_index.json"


WRITERS = {
    "generate": Writer(("generate", "--model", "zoo:tiny", "--prompt", "x", "--steps", "1"), marker="grid.png"),
    "convert": Writer(("lora", "convert", "LORA", "--to", "kohya"), folder=False),
    "convert-peft": Writer(("lora", "convert", "LORA", "--to", "peft"), marker="unet/adapter_config.json"),
    "merge": Writer(("lora", "merge", "--model", "zoo:tiny", "--lora", "LORA")),
    "embed": Writer(("lora", "embed", "--model", "zoo:tiny", "--lora", "LORA")),
    "mix": Writer(("lora", "mix", "LORA:1", "LORA:0.5", "--mode", "concat"), folder=False),
    "extract": Writer(("lora", "extract", "--base", "zoo:tiny", "--tuned", "zoo:tiny", "--rank", "2"), folder=False),
    "quantize": Writer(("quantize", "--model", "zoo:tiny", "--method", "minmax", "--steps", "1")),
    "eval": Writer(("eval", "--model", "zoo:tiny", "--metrics", "glyph", "--n", "2"), marker="metrics.json"),
    "intlora-merge": Writer(("intlora", "merge", "RUN")),
    "qlora-merge": Writer(("qlora", "merge", "RUN")),
    "bench": Writer(("bench", "--only", "files"), marker="files.json"),
    "train": Writer(("train", "--set", "model.pretrained=zoo:tiny", "--set", "train.steps=1"), marker="config.json"),
}


def _argv(writer: Writer, out: Path, lora: Path, *extra: str) -> list[str]:
    argv = [a.replace("LORA", str(lora)).replace("RUN", str(out.parent / "no-run")) for a in writer.argv]
    where = ["--set", f"output_dir={out}"] if argv[0] == "train" else ["--out", str(out)]
    return argv + where + list(extra)


def _tree(root: Path) -> dict[str, str]:
    """Every path under root with a digest of its content (folders: "dir")."""
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def _refused(capsys, argv: list[str], *needles: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert lines and lines[-1].startswith("error:"), err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


def _previous_output(writer: Writer, out: Path) -> None:
    if writer.folder:
        (out / writer.marker).parent.mkdir(parents=True, exist_ok=True)
        (out / writer.marker).write_text('{"method": "lora", "train": {}}')  # train's marker names a method
    else:
        out.write_bytes(b"the user's earlier file")


@pytest.fixture
def lora(lora_file, tmp_path) -> Path:
    path = tmp_path / "inputs" / "lora.safetensors"
    path.parent.mkdir()
    return lora_file.rename(path)


@pytest.mark.parametrize("name", list(WRITERS))
def test_an_existing_output_is_not_replaced_without_overwrite(name, lora, tmp_path, capsys):
    writer = WRITERS[name]
    out = tmp_path / ("out" if writer.folder else "out.safetensors")
    _previous_output(writer, out)
    before = _tree(tmp_path)
    _refused(capsys, _argv(writer, out, lora), "--overwrite")
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("name", list(WRITERS))
def test_the_wrong_kind_of_output_is_refused(name, lora, tmp_path, capsys):
    """A file where a folder is written (or a folder where a file is), even with --overwrite."""
    writer = WRITERS[name]
    out = tmp_path / ("out" if writer.folder else "out.safetensors")
    out.mkdir() if not writer.folder else out.write_text("the user's file")
    (out / "notes.txt").write_text("keep") if not writer.folder else None
    before = _tree(tmp_path)
    said = "is a file, where a folder is written" if writer.folder else "is a folder, where a file is written"
    _refused(capsys, _argv(writer, out, lora, "--overwrite"), str(out), said)
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("name", list(WRITERS))
def test_a_parent_that_is_a_file_is_refused(name, lora, tmp_path, capsys):
    writer = WRITERS[name]
    (tmp_path / "afile").write_text("x")
    before = _tree(tmp_path)
    _refused(capsys, _argv(writer, tmp_path / "afile" / "out", lora), "is a file, not a folder")
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("name", [n for n, w in WRITERS.items() if w.folder])
def test_a_folder_of_other_files_is_never_replaced(name, lora, tmp_path, capsys):
    writer = WRITERS[name]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    before = _tree(tmp_path)
    _refused(capsys, _argv(writer, tmp_path / "mine", lora, "--overwrite"), "other files")
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("name", list(WRITERS))
def test_the_current_folder_and_links_are_refused(name, lora, tmp_path, capsys, monkeypatch):
    writer = WRITERS[name]
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    if writer.folder:
        _refused(capsys, _argv(writer, Path("."), lora, "--overwrite"), "current folder")
    suffix = "" if writer.folder else ".safetensors"
    real, link = tmp_path / f"real{suffix}", tmp_path / f"link{suffix}"
    real.mkdir() if writer.folder else real.write_bytes(b"x")
    link.symlink_to(real)
    before = _tree(tmp_path)
    _refused(capsys, _argv(writer, link, lora, "--overwrite"), "symbolic link")
    assert _tree(tmp_path) == before


def test_a_system_error_is_one_line(lora, tmp_path, capsys, monkeypatch):
    import quantune.formats

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "out.safetensors"))

    monkeypatch.setattr(quantune.formats, "write_lora", refuse)
    line = _refused(
        capsys, ["lora", "convert", str(lora), "--to", "kohya", "--out", str(tmp_path / "out.safetensors")]
    )
    assert "Permission denied" in line and "out.safetensors" in line


@pytest.mark.parametrize("to", ["quantune", "diffusers", "kohya"])
def test_a_file_inside_an_existing_out_folder_is_not_replaced(to, lora, tmp_path, capsys):
    """`--out FOLDER` writes the format's usual file name into the folder, and never over the user's file."""
    name = "pytorch_lora_weights.safetensors" if to == "diffusers" else "lora.safetensors"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / name).write_bytes(b"the user's LoRA")
    before = _tree(tmp_path)
    _refused(capsys, ["lora", "convert", str(lora), "--to", to, "--out", str(tmp_path / "mine")], "--overwrite")
    assert _tree(tmp_path) == before
    assert main(["lora", "convert", str(lora), "--to", to, "--out", str(tmp_path / "mine"), "--overwrite"]) == 0
    assert (tmp_path / "mine" / name).read_bytes() != b"the user's LoRA"


def _numeric_options() -> list[tuple[tuple[str, ...], str]]:
    """(command words, option) for every option the CLI parses as a number."""
    found = []

    def walk(parser, words):
        for action in parser._actions:
            if action.choices and isinstance(action.choices, dict):  # sub-commands
                for word, sub in action.choices.items():
                    walk(sub, (*words, word))
            elif action.option_strings and getattr(action.type, "numeric", False):
                found.append((words, action.option_strings[-1]))

    walk(_parser(), ())
    return found


NUMERIC = _numeric_options()


def test_every_numeric_option_is_found():
    assert len(NUMERIC) >= 25 and (("generate",), "--guidance") in NUMERIC and (("quantize",), "--qdrop") in NUMERIC

    def plain(parser):  # argparse's int / float take nan, inf (float) and negative counts: none may use them
        for action in parser._actions:
            if action.choices and isinstance(action.choices, dict):
                yield from (p for sub in action.choices.values() for p in plain(sub))
            elif action.type in (int, float):
                yield action.option_strings

    assert not list(plain(_parser()))


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "abc"])
@pytest.mark.parametrize("words,option", NUMERIC, ids=[" ".join(w) + " " + o for w, o in NUMERIC])
def test_every_numeric_option_refuses_non_numbers(words, option, value, capsys):
    with pytest.raises(SystemExit) as done:
        main([*words, f"{option}={value}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and option in err[0], err
