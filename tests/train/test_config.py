"""Trainer config: TOML + --set overrides into validated dataclasses; errors name the key and the allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantune.errors import QuantuneError
from quantune.train.config import apply_overrides, resolve_config

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.toml"))


def test_defaults_and_overrides():
    cfg = resolve_config(None, ["train.steps=5", "lora.r=8", 'data.subset="cat"', "optim.lr=1e-3", "lora.alpha=2"])
    assert (cfg.train.steps, cfg.lora.r, cfg.data.subset, cfg.optim.lr, cfg.lora.alpha) == (5, 8, "cat", 1e-3, 2)
    assert apply_overrides({}, ["a.b.c=[1, 2]", "x=plain words"]) == {"a": {"b": {"c": [1, 2]}}, "x": "plain words"}


@pytest.mark.parametrize(
    "override,match",
    [
        ("train.stepz=1", "unknown config key 'train.stepz'.*steps"),
        ("colour=1", "unknown config key 'colour'.*allowed"),
        ("lora.r=0", "positive integer"),
        ("method=magic", "choose one of lora, full"),
        ('train.steps="many"', "wrong type: expected int"),
        ("optim.scheduler=foo", "constant, constant_with_warmup"),
        ("task=dreambooth", "data.source = 'dreambooth'"),
        ("train.mixed_precision=fp8", "no, fp16, bf16"),
        ("noequals", "key=value"),
        ("data.caption_dropout=1.5", "caption_dropout"),
    ],
)
def test_errors_name_the_key(override, match):
    with pytest.raises(QuantuneError, match=match) as e:
        resolve_config(None, [override])
    assert "\n" not in str(e.value)


def test_toml_file_errors(tmp_path):
    with pytest.raises(QuantuneError, match="no such config file"):
        resolve_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 1")
    with pytest.raises(QuantuneError, match="not valid TOML"):
        resolve_config(bad)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_example_config_validates(path):
    cfg = resolve_config(path)
    assert cfg.train.steps > 0


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", ["optim.lr", "optim.weight_decay", "train.noise_offset", "data.prior_loss_weight"])
def test_numbers_that_are_not_numbers_are_refused_before_loading(key, value):
    with pytest.raises(QuantuneError, match="finite"):
        resolve_config(None, [f"{key}={value}"])


def test_a_folder_or_binary_file_is_not_a_config(tmp_path):
    with pytest.raises(QuantuneError, match="is a folder"):
        resolve_config(tmp_path)
    (tmp_path / "x.toml").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(QuantuneError, match="not UTF-8"):
        resolve_config(tmp_path / "x.toml")


@pytest.mark.parametrize("name", ["sd", "sdxl", "pixart", "sd3", "flux"])
def test_lora_targets_attention_is_the_familys_attention_projections(name):
    """lora.targets unset: the family's default; "attention": its attention projections only (FLUX's default
    adds the feed-forwards); a list: as given."""
    from quantune.families import FAMILIES

    family = FAMILIES[name]
    default = resolve_config(None, []).lora.denoiser_config(family)
    attention = resolve_config(None, ['lora.targets="attention"']).lora.denoiser_config(family)
    assert default.targets == list(family.denoiser_targets)
    assert attention.targets == list(family.attention_targets)
    assert attention.targets and set(attention.targets) <= set(default.targets)
    assert not any(t.startswith(("ff", "proj_mlp")) or ".ff" in t for t in attention.targets)
    assert (default.targets != attention.targets) == (name == "flux")
    given = resolve_config(None, ['lora.targets=["to_q"]']).lora.denoiser_config(family)
    assert given.targets == ["to_q"]
