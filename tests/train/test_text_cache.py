"""data.cache_text_embeddings: the cached conditioning of a batch equals the family's own, for every family; the
config refuses it with trainable text encoders; a cached run trains."""

from __future__ import annotations

import pytest
import torch

from quantune.errors import QuantuneError
from quantune.families import family_of
from quantune.models import load_pipeline
from quantune.train.text_cache import TextCache
from quantune.train.trainer import train
from tests.families.conftest import MODELS
from tests.train.test_trainer import _cfg


def _close(a, b):
    if isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            _close(a[k], b[k])
    else:
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_cached_batch_is_the_familys_conditioning(name):
    pipe = load_pipeline(MODELS[name])
    family = family_of(pipe)
    cache = TextCache(pipe, ["red apple", "cat face", ""], (32, 32))
    assert len(cache) == 3
    with torch.no_grad():
        theirs = family.condition(pipe, ["cat face", "", "cat face"], (32, 32))
    _close(cache.condition(["cat face", "", "cat face"], "cpu"), theirs)


def test_trainable_text_encoders_cannot_be_cached(tmp_path):
    with pytest.raises(QuantuneError, match="frozen text encoders"):
        _cfg(tmp_path, "data.cache_text_embeddings=true", "lora.text_encoder=true")


def test_a_cached_run_trains_as_an_uncached_one(tmp_path):
    from safetensors.torch import load_file

    sets = ["model.pretrained=zoo:tiny-flux", "lora.text_encoder=false", "train.steps=2", "data.caption_dropout=0.5"]
    train(_cfg(tmp_path / "plain", *sets))
    train(_cfg(tmp_path / "cached", *sets, "data.cache_text_embeddings=true"))
    a, b = (load_file(str(tmp_path / run / "lora.safetensors")) for run in ("plain", "cached"))
    assert set(a) == set(b) and any(a[k].abs().max() > 0 for k in a)
    for k in a:  # the same steps; the text states differ only by round-off (T5 runs without the gradient there)
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
