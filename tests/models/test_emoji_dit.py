"""zoo:emoji-dit-init, the start of zoo:emoji-dit's pretraining recipe: a FLUX.1 transformer of zoo:emoji's size
on zoo:emoji's trained VAE and text encoder, and the recipe's first stage runs (two steps)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import FluxPipeline

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


def test_the_pretraining_recipe_runs(tmp_path):
    sets = [f"output_dir={tmp_path}", "train.steps=2", "train.batch_size=4", "log.checkpoint_every=1",
            "log.validation_every=0", "log.validation_images=1", "log.validation_steps=2", "log.tensorboard=false",
            'data.subset="^(cat|dog) face$"']  # fmt: skip
    result = train(resolve_config(ROOT / "configs" / "emoji_dit_pretrain.toml", sets))
    assert result.steps == 2 and result.final_loss == result.final_loss
    assert json.loads((tmp_path / "config.json").read_text())["model"]["pretrained"] == "zoo:emoji-dit-init"
    pipe = load_pipeline(str(tmp_path / "pipeline"))
    assert isinstance(pipe, FluxPipeline) and pipe.transformer.config.num_single_layers == 6
