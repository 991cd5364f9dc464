"""The trainer on zoo:tiny, a few steps each: outputs, resume after SIGKILL, two processes, NaN stop, DreamBooth
prior preservation, full fine-tuning, gradient checkpointing's memory, and the CPU-only refusals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantune.errors import QuantuneError
from quantune.train.config import resolve_config
from quantune.train.trainer import train

ROOT = Path(__file__).parents[2]
FAST = ["log.tensorboard=false", "log.validation_steps=2", "log.validation_images=1", 'log.validation_prompts=["cat"]']


def _cfg(tmp_path, *overrides, config="tiny_lora.toml"):
    return resolve_config(ROOT / "configs" / config, [f"output_dir={tmp_path}", *FAST, *overrides])


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def test_lora_run_writes_every_output(tmp_path):
    cfg = _cfg(tmp_path, "train.steps=4", "log.tensorboard=true", "log.validation_every=2", "log.checkpoint_every=2")
    result = train(cfg)
    assert result.steps == 4 and result.final_loss == result.final_loss  # finite
    for name in ("lora.safetensors", "pytorch_lora_weights.safetensors", "samples.png", "config.json", "result.json"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 4
    assert (tmp_path / "validation" / "step-000002.png").is_file()
    assert (tmp_path / "checkpoints" / "step-000002" / "optimizer.safetensors").is_file()
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    from quantune.models import build_tiny

    pipe = build_tiny()
    pipe.load_lora_weights(str(tmp_path / "pytorch_lora_weights.safetensors"))  # diffusers loads the adapter


def _train_argv(run_dir: Path, *overrides: str, config: str = "tiny_lora.toml") -> list[str]:
    sets = [f"output_dir={run_dir}", *FAST, *overrides]
    return [sys.executable, "-m", "quantune", "train", str(ROOT / "configs" / config)] + [f"--set={o}" for o in sets]


def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
    # both runs in fresh processes with the same thread count, so float reductions run in the same order
    common = ["train.steps=6", "log.checkpoint_every=2", "log.validation_every=0", "train.deterministic=true"]
    straight = subprocess.run(_train_argv(tmp_path / "straight", *common), env=_env(), capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-2000:]
    run_dir = tmp_path / "killed"
    argv = _train_argv(run_dir, *common)
    proc = subprocess.Popen(argv, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / "step-000004" / "state.json").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "lora.safetensors").exists()  # killed mid-training
    done = subprocess.run([*argv, "--resume", "latest"], env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    a = load_file(str(tmp_path / "straight" / "lora.safetensors"))
    b = load_file(str(run_dir / "lora.safetensors"))
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("config", ["tiny_lora.toml", "tiny_intlora.toml"])
def test_two_processes_agree_and_only_rank0_writes(tmp_path, config):
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("accelerate's launcher is not installed beside this python")
    argv = [
        str(accelerate),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "quantune",
        "-v",
        "train",
        str(ROOT / "configs" / config),
        *[f"--set={o}" for o in [f"output_dir={tmp_path}", *FAST, "train.steps=3", "log.checkpoint_every=2"]],
    ]
    done = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    digests = dict(re.findall(r"rank (\d)/2: trainable state sha256 (\w+)", done.stderr + done.stdout))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["num_processes"] == 2 and result["digest"] == digests["0"]
    assert len(list((tmp_path / "checkpoints").iterdir())) == 1  # step 2, written once


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import quantune.train.trainer as trainer

    real = trainer.denoising_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        losses = real(*args, **kwargs)
        return losses * float("nan") if calls["n"] > 2 else losses

    monkeypatch.setattr(trainer, "denoising_loss", flaky)
    cfg = _cfg(tmp_path, "train.steps=5", "log.checkpoint_every=2")
    with pytest.raises(QuantuneError, match=r"loss became nan at step 3.*step-000002"):
        train(cfg)
    assert (tmp_path / "checkpoints" / "step-000002" / "trainable.safetensors").is_file()
    assert not (tmp_path / "lora.safetensors").exists()


def test_dreambooth_with_prior_preservation(tmp_path):
    from quantune.data import openmoji_dataset

    instance = tmp_path / "instance"
    instance.mkdir()
    emoji = openmoji_dataset(size=32, subset="rocket", cache_dir=tmp_path / "cache")
    for i in range(len(emoji)):
        emoji[i]["image"].save(instance / f"{i}.png")
    cfg = _cfg(tmp_path / "run", f"data.path={instance}", "train.steps=3", config="tiny_dreambooth.toml")
    result = train(cfg)
    assert len(list((tmp_path / "run" / "class_images").glob("class_*.png"))) == 4  # generated by the base model
    assert result.steps == 3 and (tmp_path / "run" / "lora.safetensors").is_file()


def test_full_finetune_with_ema_accumulation_and_latent_cache(tmp_path):
    result = train(_cfg(tmp_path, "train.steps=3", config="tiny_full.toml"))
    from quantune.models import load_pipeline

    tuned = load_pipeline(str(tmp_path / "pipeline"))
    base = load_pipeline("zoo:tiny")
    changed = [k for k, v in tuned.unet.state_dict().items() if not torch.equal(v, base.unet.state_dict()[k])]
    assert result.steps == 3 and changed


def _saved_activation_bytes(unet, checkpointing: bool) -> int:
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    total = {"bytes": 0}

    def pack(t):
        total["bytes"] += t.numel() * t.element_size()
        return t

    x, t, c = torch.randn(2, 4, 32, 32), torch.tensor([1, 500]), torch.randn(2, 77, 32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = unet(x, t, c).sample
    out.mean().backward()
    return total["bytes"]


def test_gradient_checkpointing_lowers_activation_memory():
    from quantune.models import build_tiny

    plain = _saved_activation_bytes(build_tiny().unet, False)
    checkpointed = _saved_activation_bytes(build_tiny().unet, True)
    assert checkpointed < 0.6 * plain, (checkpointed, plain)  # measured: the saved activations shrink


def test_eight_bit_adam_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(QuantuneError, match="use_8bit_adam"):
        train(_cfg(tmp_path, "optim.use_8bit_adam=true", "train.steps=1"))


def test_autoencoder_task_trains_the_vae_and_sets_its_scale(tmp_path):
    cfg = resolve_config(
        None,
        [
            f"output_dir={tmp_path}",
            "task=autoencoder",
            "method=full",
            "data.subset=8",
            "train.steps=2",
            "train.batch_size=2",
            "log.tensorboard=false",
        ],
    )
    result = train(cfg)
    from quantune.models import build_tiny, load_pipeline

    trained = load_pipeline(str(tmp_path / "pipeline"))
    base = build_tiny()
    assert result.steps == 2 and trained.vae.config.scaling_factor != base.vae.config.scaling_factor
    assert not torch.equal(trained.vae.encoder.conv_in.weight, base.vae.encoder.conv_in.weight)
