"""The flow-matching objective (train/flow_matching.py) against its formulas, with diffusers' density and weighting,
and a flow-matching run that resumes bit-exactly."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_loss_weighting_for_sd3
from safetensors.torch import load_file

from quantune.train.config import TrainSection
from quantune.train.flow_matching import WEIGHTING_SCHEMES, flow_matching
from quantune.train.trainer import train
from tests.train.test_trainer import _cfg


@pytest.mark.parametrize("scheme", WEIGHTING_SCHEMES)
def test_noisy_latents_target_and_weights_follow_the_formulas(scheme):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    x0, eps = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    options = TrainSection(weighting_scheme=scheme)
    noisy, t, target, weight = flow_matching(scheduler, x0, eps, torch.Generator().manual_seed(0), options)
    sigma = t / 1000  # the scheduler's sigmas are its timesteps / T, the shift applied to both
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - s) * x0 + s * eps, atol=1e-6, rtol=0)
    torch.testing.assert_close(target, eps - x0, atol=0, rtol=0)
    torch.testing.assert_close(weight, compute_loss_weighting_for_sd3(scheme, sigma).float(), atol=1e-5, rtol=1e-5)
    # sigma is one of the scheduler's shifted sigmas (3 s / (1 + 2 s) on the uniform grid s), never unshifted
    grid = torch.linspace(1, 1 / 1000, 1000)
    shifted = 3 * grid / (1 + 2 * grid)
    assert all(bool((shifted - v).abs().min() < 1e-6) for v in sigma)


def test_a_dynamically_shifted_scheduler_trains_on_the_unshifted_table():
    """FLUX's scheduler shifts at sampling time only (use_dynamic_shifting): training draws the plain grid."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    x = torch.zeros(64, 1, 1, 1)
    _, t, _, _ = flow_matching(scheduler, x, x, torch.Generator().manual_seed(0), TrainSection())
    grid = torch.linspace(1, 1 / 1000, 1000)
    assert all(bool((grid - v / 1000).abs().min() < 1e-6) for v in t)


def test_a_scheduler_that_contradicts_the_family_is_refused():
    from diffusers import DDIMScheduler

    from quantune.errors import QuantuneError
    from quantune.models import load_pipeline
    from quantune.train.objective import training_scheduler

    pipe = load_pipeline("zoo:tiny-flux")
    pipe.scheduler = DDIMScheduler()
    with pytest.raises(QuantuneError, match="flux trains with the flow objective.*DDIMScheduler"):
        training_scheduler(pipe)


def test_the_timestep_density_is_seeded_and_logit_normal_centres_it():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    x = torch.zeros(4000, 1, 1, 1)
    draw = [
        flow_matching(scheduler, x, x, torch.Generator().manual_seed(7), TrainSection(weighting_scheme=s))[1]
        for s in ("logit_normal", "logit_normal", "none")
    ]
    assert torch.equal(draw[0], draw[1])  # from the step's generator: a resumed run draws the same
    spread = [float((d / 1000 - 0.5).abs().mean()) for d in draw[1:]]
    assert spread[0] < spread[1]  # logit-normal puts more mass in the middle than uniform
    assert math.isclose(spread[1], 0.25, abs_tol=0.02)


def test_a_flow_matching_run_resumes_bit_exactly(tmp_path):
    common = ["model.pretrained=zoo:tiny-flux", "train.steps=4", "train.weighting_scheme=logit_normal",
              "log.validation_every=0", "lora.text_encoder=true"]  # fmt: skip
    train(_cfg(tmp_path / "straight", *common))
    train(_cfg(tmp_path / "resumed", *common[:1], "train.steps=2", *common[2:], "log.checkpoint_every=1"))
    train(_cfg(tmp_path / "resumed", *common, "log.checkpoint_every=1"), resume="latest")
    a = load_file(str(tmp_path / "straight" / "lora.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "lora.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
