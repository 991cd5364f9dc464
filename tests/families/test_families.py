"""The model-family seam: recognition, the conditioning a training step feeds (equal to what the pipeline's own
sampler feeds), the tiny zoo builders, and the one-line refusal of an unknown pipeline."""

from __future__ import annotations

import pytest
import torch

from quantune.errors import QuantuneError
from quantune.families import FAMILIES, family_of
from quantune.models import load_pipeline
from tests.families.conftest import MODELS


def test_every_family_has_a_tiny_model():
    assert set(MODELS) == set(FAMILIES)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_recognised_and_deterministic(name):
    a, b = load_pipeline(MODELS[name]), load_pipeline(MODELS[name])
    assert family_of(a).name == name
    sa, sb = family_of(a).denoiser_of(a).state_dict(), family_of(b).denoiser_of(b).state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_conditioning_equals_the_samplers(family_ref):
    """The denoiser inputs a training step builds from captions are those the pipeline's own sampler passes."""
    pipe = load_pipeline(family_ref)
    family = family_of(pipe)
    denoiser = family.denoiser_of(pipe)
    seen = []
    hook = denoiser.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    try:
        pipe(["red apple"], num_inference_steps=1, guidance_scale=1.0, height=32, width=32, output_type="latent",
             **family.call_kwargs(pipe))  # fmt: skip
    finally:
        hook.remove()
    with torch.no_grad():  # as the sampler runs (T5's attention kernel differs with the gradient on)
        mine = family.condition(pipe, ["red apple"], (32, 32))
    assert "encoder_hidden_states" in mine
    for key, value in mine.items():  # text states, masks, pooled projections, ids, added conditions
        theirs = seen[0][key]
        for k, v in value.items() if isinstance(value, dict) else [(None, value)]:
            torch.testing.assert_close(v, theirs[k] if k else theirs, atol=0, rtol=0)


def test_unknown_pipeline_is_one_line_listing_the_families():
    class Strange:
        unet = None

    with pytest.raises(QuantuneError, match=r"supports sdxl .*sd "):
        family_of(Strange())


def _sampler_view(name: str, pipe, args, kwargs, out):
    """(latents [B, C, h, w], timesteps on the scheduler's scale, prediction [B, C, h, w]) of one denoiser call
    made by the pipeline's own sampler, in the conventions of `Family.predict`."""
    from diffusers import FluxPipeline

    sample = out[0] if isinstance(out, tuple) else out.sample
    x = args[0] if args else kwargs["hidden_states"]
    t = args[1] if len(args) > 1 else kwargs["timestep"]
    if name == "flux":  # packed 2 x 2 patches, sigma-scaled timesteps
        unpack = lambda z: FluxPipeline._unpack_latents(z, 32, 32, pipe.vae_scale_factor)  # noqa: E731
        return unpack(x), t * 1000, unpack(sample)
    if name == "pixart":  # learned variance: the epsilon half
        return x, t, sample.chunk(2, dim=1)[0]
    return x, t, sample


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_training_forward_is_the_samplers(name):
    """`Family.predict` on the sampler's own latents and timestep gives the sampler's prediction: the packing,
    the timestep scale, the guidance input and the output conventions all agree."""
    pipe = load_pipeline(MODELS[name])
    family = family_of(pipe)
    seen = []
    hook = family.denoiser_of(pipe).register_forward_hook(
        lambda m, a, kw, out: seen.append((a, kw, out)) if not seen else None, with_kwargs=True
    )
    try:
        pipe(["red apple"], num_inference_steps=2, guidance_scale=1.0, height=32, width=32, output_type="latent",
             generator=torch.Generator().manual_seed(0), **family.call_kwargs(pipe))  # fmt: skip
    finally:
        hook.remove()
    x, t, theirs = _sampler_view(name, pipe, *seen[0])
    with torch.no_grad():
        cond = family.condition(pipe, ["red apple"], (32, 32))
        mine = family.predict(pipe, family.denoiser_of(pipe), x, t, cond, guidance=1.0)
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
