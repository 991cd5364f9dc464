"""Calibration data: the UNet's inputs along FP sampler trajectories, picked per step as the method says (EDA-DM's
TDAC, arXiv 2401.04585 section 4.1, or uniformly as Q-Diffusion, arXiv 2302.04304; docs/quantization.md).

`collect_calibration(pipe, config, prompts)` runs the pipeline's own sampler (text-to-image with classifier-free
guidance, or unconditional DDPM/DDIM) for N = config.calib_samples trajectories, records every UNet call's
arguments (x_t, t, conditioning; tensors that do not change along a trajectory are kept once) and the TDAC feature
(the input of the mid-block attention, or of the mid block when it has none). Step s then receives n_s samples
(the method's `calibration_counts`, ptq/methods/), each the latent of a distinct trajectory at that step, with its
timestep and conditioning; under guidance a sample is its two UNet rows (unconditional and conditional), as the
sampler feeds them.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree

from quantune.errors import QuantuneError
from quantune.families import family_of
from quantune.ptq.config import PTQConfig
from quantune.ptq.methods import method_for

logger = logging.getLogger(__name__)
CHUNK = 32  # trajectories per pipeline call
FEATURE_TRAJECTORIES = 32  # trajectories whose features TDAC scores


class Shared:
    """A denoiser input without a batch dim (FLUX's position ids: Family.ptq_shared_inputs), kept once as is."""

    def __init__(self, value) -> None:
        self.value = value


def _unshared(leaves: list) -> list:
    return [x.value if isinstance(x, Shared) else x for x in leaves]


@dataclass
class CalibData:
    """Calibration samples: UNet keyword arguments with per-row tensors (rows = samples x guidance rows)."""

    leaves: list  # per-row tensors [rows, ...] or constants, in the pytree order of `spec`
    spec: object
    rows: int
    counts: list[int]  # samples per sampler step (UNet call)
    timesteps: list[float]
    device: torch.device = torch.device("cpu")  # where the UNet runs; samples are kept on the CPU

    def kwargs(self, index: torch.Tensor | slice | None = None) -> dict:
        index = slice(None) if index is None else index
        leaves = [x[index].to(self.device) if isinstance(x, torch.Tensor) else x for x in self.leaves]
        return pytree.tree_unflatten(_unshared(leaves), self.spec)

    def batches(self, batch_size: int, on_device: bool = True):
        """Consecutive batches of UNet keyword arguments, on `device` (or left on the CPU: `on_device=False`)."""
        for i in range(0, self.rows, batch_size):
            index = slice(i, min(i + batch_size, self.rows))
            if on_device:
                yield self.kwargs(index)
            else:
                leaves = [x[index] if isinstance(x, torch.Tensor) else x for x in self.leaves]
                yield pytree.tree_unflatten(_unshared(leaves), self.spec)


def _is_text_pipeline(pipe) -> bool:
    return bool(family_of(pipe).text_encoders_of(pipe))


def _run_chunk(pipe, prompts: list[str], cfg: PTQConfig, seed: int):
    """One pipeline call; returns (UNet calls as bound-argument dicts, features per call)."""
    family = family_of(pipe)
    unet = family.denoiser_of(pipe)
    signature = inspect.signature(unet.forward)
    calls, features = [], []

    def record_call(module, args, kwargs):
        bound = signature.bind(*args, **kwargs)
        shared = family.ptq_shared_inputs
        calls.append({k: Shared(v) if k in shared else v for k, v in bound.arguments.items() if k != "return_dict"})

    def record_feature(module, args, kwargs):
        x = (args[0] if args else kwargs["hidden_states"]).detach().float().cpu()
        features.append(x.transpose(1, 2) if x.dim() == 3 else x)  # tokens [B, N, C] -> channels first

    hooks = [
        unet.register_forward_pre_hook(record_call, with_kwargs=True),
        family.tdac_feature_module(unet).register_forward_pre_hook(record_feature, with_kwargs=True),
    ]
    generator = torch.Generator().manual_seed(seed)
    try:
        with torch.no_grad():
            if _is_text_pipeline(pipe):
                size = cfg.resolution or family.default_size(pipe)
                guidance = family.guidance_kwargs(pipe, cfg.guidance_scale, len(prompts))
                pipe(prompts, num_inference_steps=cfg.steps, height=size, width=size, generator=generator,
                     output_type="latent", **guidance, **family.call_kwargs(pipe))  # fmt: skip
            else:
                if cfg.resolution and "height" not in inspect.signature(pipe.__call__).parameters:
                    raise QuantuneError(
                        f"{type(pipe).__name__} samples at its UNet's size only: leave out --resolution"
                    )
                extra = {"height": cfg.resolution, "width": cfg.resolution} if cfg.resolution else {}
                pipe(batch_size=len(prompts), num_inference_steps=cfg.steps, generator=generator, output_type="np",
                     **extra)  # fmt: skip
    finally:
        for h in hooks:
            h.remove()
    if not calls or len(features) != len(calls):
        raise QuantuneError(
            f"the sampler's {len(calls)} denoiser calls did not all reach its TDAC feature module: unsupported"
        )
    return calls, features


def _trajectory_major(x, batch: int, groups: int):
    """A call's per-row tensor [groups * batch, ...] -> [batch, groups, ...]; a 0-dim one is broadcast."""
    if not isinstance(x, torch.Tensor):
        return x
    if x.dim() == 0:
        x = x.expand(groups * batch)
    if x.shape[0] != groups * batch:
        return x
    return x.detach().cpu().reshape(groups, batch, *x.shape[1:]).transpose(0, 1)


def collect_calibration(pipe, cfg: PTQConfig, prompts: list[str] | None = None) -> tuple[CalibData, torch.Tensor]:
    """(calibration data, the TDAC weights per step: all ones for uniform calibration)."""
    n = cfg.calib_samples
    if _is_text_pipeline(pipe) and not prompts:
        raise QuantuneError("a text-to-image pipeline needs calibration prompts: pass --prompts FILE")
    per_step: list[list] = []  # per UNet call of the sampler: leaves [traj, groups, ...] per chunk
    spec, features, timesteps = None, [], []
    for c, start in enumerate(range(0, n, CHUNK)):
        size = min(CHUNK, n - start)
        chunk_prompts = [prompts[(start + i) % len(prompts)] for i in range(size)] if prompts else [""] * size
        calls, feats = _run_chunk(pipe, chunk_prompts, cfg, cfg.seed + c)
        if not all(torch.isfinite(f).all() for f in feats):
            raise QuantuneError(
                "the float model produced NaN/inf along the calibration trajectories: check the model (or its "
                "dtype: calibrate in fp32) before quantizing it"
            )
        groups = next(iter(calls[0].values())).shape[0] // size  # the first argument: the latents
        if c == 0:  # multistep samplers (PNDM: steps + 1 calls) give the number of calibration "steps"
            per_step = [[] for _ in calls]
            if n < len(calls):
                raise QuantuneError(
                    f"calib_samples = {n} is fewer than the sampler's {len(calls)} UNet calls: raise --calib-samples"
                )
        elif len(calls) != len(per_step):
            raise QuantuneError("the sampler called the UNet a different number of times per batch: unsupported")
        for s, call in enumerate(calls):
            leaves, spec = pytree.tree_flatten(call)
            per_step[s].append([_trajectory_major(x, size, groups) for x in leaves])
            if c == 0:
                t = float(torch.as_tensor(call["timestep"]).reshape(-1)[0])
                timesteps.append(int(t) if t.is_integer() else round(t, 4))  # FLUX: t / 1000
        if start < FEATURE_TRAJECTORIES:
            features.append(torch.stack([f.reshape(groups, size, *f.shape[1:])[-1] for f in feats]))
    steps = len(per_step)
    weights, counts = method_for(cfg).calibration_counts(torch.cat(features, 1), n)
    logger.info("calibration samples per step: %s", counts)
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(n, generator=g)  # the trajectory each sample comes from
    step_of = torch.repeat_interleave(torch.arange(steps), torch.tensor(counts))  # step of each sample
    step_of = step_of[torch.randperm(n, generator=g)]  # samples in random step order (range EMAs see all steps)
    leaves = []
    for j in range(len(per_step[0][0])):
        first = per_step[0][0][j]
        if not isinstance(first, torch.Tensor) or first.dim() < 2 or first.shape[0] != min(CHUNK, n):
            leaves.append(first)
            continue
        by_step = [torch.cat([chunk[j] for chunk in per_step[s]]) for s in range(steps)]  # [n, groups, ...]
        picked = torch.stack([by_step[int(s)][int(t)] for s, t in zip(step_of, order)])
        leaves.append(picked.reshape(-1, *picked.shape[2:]))
    rows = n * groups
    return CalibData(leaves, spec, rows, counts, timesteps, family_of(pipe).denoiser_of(pipe).device), weights
