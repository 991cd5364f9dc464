"""zoo:tiny: a real, deterministic StableDiffusionPipeline; load_pipeline's three kinds of reference."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline

from quantune.errors import QuantuneError
from quantune.models import build_tiny, load_pipeline, load_tokenizer


def test_tiny_is_a_deterministic_sd_pipeline():
    a, b = build_tiny(), build_tiny()
    assert isinstance(a, StableDiffusionPipeline)
    assert type(a.unet).__name__ == "UNet2DConditionModel" and a.unet.config.cross_attention_dim == 32
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_tiny_generates_64px(tiny):
    out = tiny("red apple", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 64, 64, 3)
    assert out.images.std() > 0.01


def test_tokenizer_is_clip_style():
    tok = load_tokenizer()
    ids = tok("red apple").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(ids[1:2]) == ["red</w>"]
    assert tok.model_max_length == 77


def test_local_folder_round_trip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "m")
    loaded = load_pipeline(str(tmp_path / "m"))
    sd_a, sd_b = tiny.unet.state_dict(), loaded.unet.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_bad_references(tmp_path):
    with pytest.raises(QuantuneError, match="zoo:tiny"):
        load_pipeline("zoo:nope")
    with pytest.raises(QuantuneError, match="model_index.json"):
        load_pipeline(str(tmp_path))
    with pytest.raises(QuantuneError, match="no such model folder"):
        load_pipeline("./missing/folder")


def test_unreachable_hub_id_names_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(QuantuneError, match="hf download") as e:
        load_pipeline("nobody-xyz/not-a-model")
    assert "\n" not in str(e.value)


def test_resolve_device_on_cpu():
    import torch

    from quantune.models import resolve_device

    dev, dtype = resolve_device("cpu", "auto")
    assert dev.type == "cpu" and dtype == torch.float32
    assert resolve_device("cpu", "bf16")[1] == torch.bfloat16
    if not torch.cuda.is_available():
        assert resolve_device("auto", "auto")[0].type == "cpu"
        with pytest.raises(QuantuneError, match="--device cpu"):
            resolve_device("cuda", "auto")


def test_zoo_emoji_is_shipped_small_and_generates():
    from quantune.models.zoo import EMOJI_DIR

    size = sum(p.stat().st_size for p in EMOJI_DIR.rglob("*") if p.is_file())
    assert size < 30 * 2**20
    pipe = load_pipeline("zoo:emoji")
    assert isinstance(pipe, StableDiffusionPipeline) and pipe.unet.dtype == torch.float32
    image = pipe("cat face", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_zoo_emoji_draws_what_it_is_asked():
    """The shipped weights work: samples of four prompts from the README grid are recognised by the OpenMoji network
    as their glyph (top-5; benchmarks/results/emoji_grid.md has all eight prompts and 6 seeds)."""
    from quantune.eval.recognition import glyph_ranks

    prompts = ["cat face", "red apple", "green heart", "snowman"] * 2
    pipe = load_pipeline("zoo:emoji")
    gens = [torch.Generator().manual_seed(i // 4) for i in range(len(prompts))]
    images = pipe(prompts, num_inference_steps=20, guidance_scale=4.0, generator=gens).images
    ranks = glyph_ranks(images, prompts)
    assert sum(r <= 5 for r in ranks) >= 7, dict(zip(prompts, ranks))
