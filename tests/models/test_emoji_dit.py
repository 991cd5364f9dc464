"""zoo:emoji-dit-init, the start of zoo:emoji-dit's pretraining recipe: a FLUX.1 transformer of zoo:emoji's size
on zoo:emoji's trained VAE and text encoder; the recipe's first stage runs (two steps) and its result packages as
zoo:emoji-dit; guidance as the transformer was trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline

from quantune.errors import QuantuneError
from quantune.models import load_pipeline
from quantune.train.config import resolve_config
from quantune.train.trainer import train

ROOT = Path(__file__).parents[2]


def test_emoji_dit_init_is_a_flux_pipeline_on_zoo_emojis_parts():
    pipe = load_pipeline("zoo:emoji-dit-init")
    emoji = load_pipeline("zoo:emoji")
    assert isinstance(pipe, FluxPipeline)
    config = pipe.transformer.config
    assert (config.num_layers, config.num_single_layers, config.guidance_embeds) == (2, 6, False)
    assert 6.0e6 < sum(p.numel() for p in pipe.transformer.parameters()) < 6.5e6  # zoo:emoji's UNet: 5.9 M
    for ours, theirs in ((pipe.vae, emoji.vae), (pipe.text_encoder, emoji.text_encoder),
                         (pipe.text_encoder_2, emoji.text_encoder)):  # fmt: skip
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    image = pipe("cat face", num_inference_steps=2, height=32, width=32, max_sequence_length=16,
                 generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    assert image.size == (32, 32)


def test_the_pretraining_recipe_runs_and_packages(tmp_path, monkeypatch):
    sets = [f"output_dir={tmp_path}", "train.steps=2", "train.batch_size=4", "log.checkpoint_every=1",
            "log.validation_every=0", "log.validation_images=1", "log.validation_steps=2", "log.tensorboard=false",
            'data.subset="^(cat|dog) face$"']  # fmt: skip
    result = train(resolve_config(ROOT / "configs" / "emoji_dit_pretrain.toml", sets))
    assert result.steps == 2 and result.final_loss == result.final_loss
    assert json.loads((tmp_path / "config.json").read_text())["model"]["pretrained"] == "zoo:emoji-dit-init"
    pipe = load_pipeline(str(tmp_path / "pipeline"))
    assert isinstance(pipe, FluxPipeline) and pipe.transformer.config.num_single_layers == 6
    # packaged as zoo:emoji-dit (the transformer in fp16; VAE and text encoders are zoo:emoji's) and loaded back
    from quantune.families import flux
    from quantune.models.package_emoji import package

    shipped = tmp_path / "emoji-dit"
    assert package(tmp_path / "pipeline", shipped, {"steps": 2}, zoo="emoji-dit") < 15 * 2**20
    monkeypatch.setattr(flux, "EMOJI_DIT_DIR", shipped)
    zoo = load_pipeline("zoo:emoji-dit")
    assert zoo.transformer.dtype == torch.float32 and zoo.transformer.config["_classifier_free_guidance"]
    for a, b in zip(zoo.transformer.state_dict().values(), pipe.transformer.state_dict().values()):
        torch.testing.assert_close(a, b.half().float(), rtol=0, atol=0)
    monkeypatch.setattr(flux, "emoji_parts", lambda: {"vae": "another"})  # zoo:emoji repackaged since
    with pytest.raises(QuantuneError, match="another zoo:emoji VAE / text encoder"):
        load_pipeline("zoo:emoji-dit")
    monkeypatch.setattr(flux, "EMOJI_DIT_DIR", tmp_path / "nothing")
    with pytest.raises(QuantuneError, match="zoo:emoji-dit's weights are missing"):
        load_pipeline("zoo:emoji-dit")


def test_guidance_follows_the_transformer():
    """FLUX-dev's embedded guidance; true CFG for a transformer trained for it (zoo:emoji-dit's marker); none for
    one without either (FLUX.1-schnell), as diffusers."""
    from quantune.families import family_of
    from quantune.families.flux import build_tiny_flux

    dit = load_pipeline("zoo:emoji-dit-init")
    family = family_of(dit)
    assert family.guidance_kwargs(dit, 4.0, 2) == {"true_cfg_scale": 4.0, "negative_prompt": ["", ""]}
    assert family.guidance_kwargs(dit, 1.0, 2) == {} and family.guidance_kwargs(dit, None, 2) == {}
    dev = build_tiny_flux()
    assert family.guidance_kwargs(dev, 3.5, 1) == {"guidance_scale": 3.5}
    dit.transformer.register_to_config(_classifier_free_guidance=False)
    assert family.guidance_kwargs(dit, 4.0, 2) == {}


def test_sampling_with_true_cfg_runs_through_the_eval_path():
    from quantune.eval.run import EvalConfig, sample_images

    pipe = load_pipeline("zoo:emoji-dit-init")
    images = sample_images(pipe, ["cat face", "rocket"], EvalConfig(steps=2, guidance_scale=4.0, batch=2))
    assert [im.size for im in images] == [(32, 32), (32, 32)]
