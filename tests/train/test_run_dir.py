"""A training run's folder: a failed start leaves nothing, a previous run is replaced only with --overwrite (and put
back if the new start fails), an interrupted save's temporaries are cleaned on resume, and the error line is last."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from quantune.cli import main

ROOT = Path(__file__).parents[2]
FAST = ["log.tensorboard=true", "log.validation_every=0", "log.validation_images=1", 'log.validation_prompts=["cat"]']


def _train(capsys, run: Path, *sets: str, extra: tuple[str, ...] = ()) -> tuple[int, list[str]]:
    argv = ["train", str(ROOT / "configs" / "tiny_lora.toml"), *extra]
    for s in [f"output_dir={run}", *FAST, "train.steps=2", *sets]:
        argv += ["--set", s]
    rc = main(argv)
    return rc, capsys.readouterr().err.strip().splitlines()


FAILED_STARTS = {
    "unknown model": (("model.pretrained=zoo:nothing",), ()),
    "missing data folder": (("data.source=folder", "data.path=/nonexistent/images"), ()),
    "nothing to resume": ((), ("--resume", "latest")),
    "autoencoder, unknown model": (("task=autoencoder", "model.pretrained=zoo:nothing"), ()),
    "after config.json and logs": ((), ()),  # _late_failure below makes the last step of the start fail
}


def _late_failure(monkeypatch):
    """Make the start fail at its very end, after config.json is written and TensorBoard is opened."""
    import quantune.train.trainer as trainer

    def fail(cfg):
        raise trainer.QuantuneError("a failure at the end of the start")

    monkeypatch.setattr(trainer, "_flat_hparams", fail)


@pytest.mark.parametrize("existed", [False, True], ids=["new folder", "empty folder"])
@pytest.mark.parametrize("case", list(FAILED_STARTS))
def test_a_failed_start_leaves_nothing_behind(case, existed, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    if existed:
        run.mkdir()
    if case.startswith("after"):
        _late_failure(monkeypatch)
    sets, extra = FAILED_STARTS[case]
    rc, err = _train(capsys, run, *sets, extra=extra)
    assert rc == 2 and err[-1].startswith("error:") and not any("Traceback" in line for line in err), err
    assert (run.is_dir() and not any(run.iterdir())) if existed else not run.exists()


def test_a_previous_run_is_replaced_only_with_overwrite(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert _train(capsys, run, "log.checkpoint_every=1")[0] == 0
    first = (run / "lora.safetensors").read_bytes()
    hf_model = tmp_path / "hf_model"  # a config.json that is not a run's: never replaced
    hf_model.mkdir()
    (hf_model / "config.json").write_text('{"hidden_size": 32}')
    rc, err = _train(capsys, hf_model, extra=("--overwrite",))
    assert rc == 2 and "other files" in err[-1] and (hf_model / "config.json").read_text() == '{"hidden_size": 32}'
    assert (run / "checkpoints" / "step-000001").is_dir()
    rc, err = _train(capsys, run)
    assert rc == 2 and "--resume latest" in err[-1] and "--overwrite" in err[-1]
    assert (run / "lora.safetensors").read_bytes() == first  # untouched
    rc, err = _train(capsys, run, "model.pretrained=zoo:nothing", extra=("--overwrite",))
    assert rc == 2 and (run / "lora.safetensors").read_bytes() == first  # a failed start puts the old run back
    with monkeypatch.context() as m:
        _late_failure(m)
        rc, err = _train(capsys, run, extra=("--overwrite",))
    assert rc == 2 and "end of the start" in err[-1] and (run / "lora.safetensors").read_bytes() == first
    assert (run / "checkpoints" / "step-000001").is_dir() and not list(tmp_path.glob(".run.*"))
    rc, err = _train(capsys, run, extra=("--overwrite", "--resume", "latest"))
    assert rc == 2 and "one of them" in err[-1]
    rc, err = _train(capsys, run, "train.seed=5", extra=("--overwrite",))
    assert rc == 0, err
    assert not (run / "checkpoints").exists()  # the old run is gone as a whole, not mixed into the new one
    assert (run / "lora.safetensors").read_bytes() != first and not list(tmp_path.glob(".run.*"))


def test_resume_removes_an_interrupted_save_and_says_so(tmp_path, capsys, caplog):
    run = tmp_path / "run"
    assert _train(capsys, run, "log.checkpoint_every=1")[0] == 0
    stale = run / "checkpoints" / ".step-000002.k3j4.tmp"
    stale.mkdir()
    (stale / "trainable.safetensors").write_bytes(b"half")
    with caplog.at_level(logging.INFO, logger="quantune"):
        rc, err = _train(capsys, run, "train.steps=3", "log.checkpoint_every=1", extra=("--resume", "latest"))
    assert rc == 0, err
    assert not stale.exists() and ".step-000002.k3j4.tmp" in caplog.text


def test_the_error_line_is_the_last_line_after_a_nan_stop(tmp_path, capsys, monkeypatch):
    import quantune.train.trainer as trainer

    real, calls = trainer.denoising_loss, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs) * (float("nan") if calls["n"] > 1 else 1.0)

    monkeypatch.setattr(trainer, "denoising_loss", flaky)
    rc, err = _train(capsys, tmp_path / "run", "train.steps=4")
    assert rc == 2 and err[-1].startswith("error: the loss became nan at step 2"), err
    assert any("train" in line for line in err[:-1])  # the progress bar was drawn, and closed before the error
