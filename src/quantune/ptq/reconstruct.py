"""Block reconstruction: BRECQ / Q-Diffusion (block-output loss, AdaRound then step sizes; Li et al. 2021, arXiv
2102.05426; Li et al. 2023, arXiv 2302.04304) and EDA-DM's FBR (Fine-grained Block Reconstruction; arXiv 2401.04585
section 4.2); docs/quantization.md.

For a unit (block or lone layer) with FP input X_fp (the float model's) and quantized-model input X_q (the model
with every earlier unit quantized):
    L_FBR = ||B_q(X~) - B_fp(X_fp)||^2 + add_loss * sum_{l in inner layers} ||g_l^q - g_l^fp||^2
where g_l are the outputs of the unit's quantized layers except the last one it calls, ||.||^2 is the squared error
summed over dim 1 and averaged over the rest, and X~ is X_q (Q-Diffusion) or, with QDrop, a per-element random mix
of X_fp and X_q whose activation quantizers each quantize an element with probability 1 - p (EDA-DM).
A method says how with a ReconRecipe (its stages, QDrop, the FBR weight add_loss; ptq/methods/):
- eda-dm: AdaRound V and the activation step sizes learned jointly, Adam (lr_w, lr_a) with cosine decay, `iters`
  iterations. EDA-DM's reference has no rounding regulariser; quantune keeps BRECQ's (weight `round_reg`, 0.01)
  because without it h(V) stays near 0.5 and the hard rounding loses what the soft one learned (measured in
  tests/ptq/test_reconstruct.py: on a W3 layer with correlated inputs, round-to-nearest 3.93; learned without it
  3.72 (its soft loss 0.001); with it 0.70). `round_reg = 0` reproduces the reference.
- qdiffusion: `iters` iterations of AdaRound V with the block-output loss and the annealed regulariser (activation
  quantizers off), then `iters` of the activation step sizes with the rounding hard.
Afterwards rounding is hard (1[V >= 0]) and QDrop off; the unit stays quantized for the units after it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import _pytree as pytree

from quantune.errors import QuantuneError
from quantune.ptq.act_lsq import LSQActQuantizer
from quantune.ptq.adaround import beta_schedule
from quantune.ptq.config import PTQConfig
from quantune.ptq.wrap import PTQLayer, set_quant

logger = logging.getLogger(__name__)


class _Stop(Exception):
    pass


def capture_inputs(model, unit, batches) -> tuple[list, object, int]:
    """The unit's call arguments over all calibration batches, concatenated: (leaves, pytree spec, rows)."""
    seen: list = []

    def grab(module, args, kwargs):
        seen.append(pytree.tree_flatten((args, kwargs)))
        raise _Stop

    hook = unit.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for kwargs in batches:
                try:
                    model(**kwargs)
                except _Stop:
                    pass
    finally:
        hook.remove()
    if not seen:
        raise QuantuneError("a reconstruction unit was never reached by the calibration data")
    spec, first = seen[0][1], seen[0][0]
    rows = sum(_rows(leaves) for leaves, _ in seen)
    leaves = []
    for j, x in enumerate(first):
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == _rows(first):
            leaves.append(torch.cat([s[0][j].detach() for s in seen]))
        else:
            leaves.append(x)
    return leaves, spec, rows


def _rows(leaves) -> int:
    tensors = [x for x in leaves if isinstance(x, torch.Tensor) and x.dim() > 0]
    return tensors[0].shape[0]


def _pick(captured, index, rows):
    leaves, spec, _ = captured
    out = [x[index] if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == rows else x for x in leaves]
    return pytree.tree_unflatten(out, spec)


def _qdrop_mix(fp, q, p: float):
    def mix(a, b):
        if isinstance(a, torch.Tensor) and a.is_floating_point() and not torch.equal(a, b):
            return torch.where(torch.rand_like(a) < p, a, b)
        return b

    return pytree.tree_map(mix, fp, q)


def rec_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over dim 1 and averaged over the rest (the reference's `lp_loss`, whatever the layout:
    channels of [B, C, H, W], tokens of a transformer block's [B, N, C], in UNets and DiTs alike)."""
    diff = (out.float() - target.float()).pow(2)
    return diff.sum(1).mean() if diff.dim() > 1 else diff.mean()


def fbr_loss(out, target, inner_q: list, inner_fp: list, add_loss: float) -> torch.Tensor:
    """L_FBR = rec(B_q, B_fp) + add_loss * sum of rec(g_l^q, g_l^fp) over the recorded inner layers but the last
    (the last one's output is the block output's source, already in the first term). `out` / `target`: the block
    output, or the list of its outputs (a joint block's text and image streams), whose terms are summed."""
    outs, targets = (out, target) if isinstance(out, list) else ([out], [target])
    loss = sum(rec_loss(o, t) for o, t in zip(outs, targets, strict=True))
    if add_loss and len(inner_q) > 1:
        loss = loss + add_loss * sum(rec_loss(a, b) for a, b in zip(inner_q[:-1], inner_fp[:-1]))
    return loss


def _outputs(out) -> list[torch.Tensor]:
    """A unit's float output tensors: one (a UNet block) or a joint block's two streams (text, image)."""
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor) and x.is_floating_point()]


class _InnerOutputs:
    """Records the outputs of a unit's quantized layers, in call order."""

    def __init__(self, layers: list[PTQLayer]) -> None:
        self.outputs: list[torch.Tensor] = []
        self.hooks = [m.register_forward_hook(lambda mod, i, o: self.outputs.append(o)) for m in layers]

    def take(self) -> list[torch.Tensor]:
        out, self.outputs = self.outputs, []
        return out

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


@dataclass(frozen=True)
class ReconRecipe:
    """How a method reconstructs a unit: `stages`, each (learn AdaRound's V, learn the activation step sizes) for
    `iters` iterations; QDrop probability `qdrop` (0: the quantized input as is, every element quantized); FBR's
    inner-layer weight `add_loss` (0: the block-output loss only)."""

    stages: tuple[tuple[bool, bool], ...]
    qdrop: float = 0.0
    add_loss: float = 0.0

    def __post_init__(self) -> None:
        if not self.stages or not all(len(s) == 2 for s in self.stages):
            raise QuantuneError("a reconstruction recipe needs stages of (learn weights, learn activations)")
        if not 0.0 <= self.qdrop < 1.0 or self.add_loss < 0:
            raise QuantuneError(f"bad recipe: qdrop = {self.qdrop} must be in [0, 1), add_loss = {self.add_loss} >= 0")


@dataclass
class _Unit:
    """One unit under reconstruction: its quantized layers, LSQ quantizers, captured inputs, inner-output record."""

    module: nn.Module
    layers: list[PTQLayer]
    lsq: list[LSQActQuantizer]
    fp_in: tuple
    q_in: tuple
    inner: _InnerOutputs | None


def reconstruct_unit(unit, fp_in, q_in, cfg: PTQConfig, generator: torch.Generator, recipe=None) -> float:
    """Reconstruct one unit in place (see the module docstring) as `recipe` says (None: the recipe of cfg's
    method); returns the last reconstruction loss (FBR or block output, without the rounding regulariser)."""
    if recipe is None:
        from quantune.ptq.methods import method_for  # deferred: the methods import this module

        recipe = method_for(cfg).recipe()
    layers = [m for m in unit.modules() if isinstance(m, PTQLayer)] if not isinstance(unit, PTQLayer) else [unit]
    lsq = [m for m in unit.modules() if isinstance(m, LSQActQuantizer)]
    inner = _InnerOutputs(layers) if recipe.add_loss > 0 and len(layers) > 1 else None
    u = _Unit(unit, layers, lsq, fp_in, q_in, inner)
    loss_value = float("nan")
    try:
        for learn_w, learn_a in recipe.stages:
            loss_value = _stage(u, cfg, recipe, generator, learn_w, learn_a, loss_value)
    finally:
        if inner:
            inner.close()
        for m in layers:
            m.wq.hard = True
        for q in lsq:
            q.qdrop, q.enabled = 0.0, True
        set_quant(unit, True)
    return loss_value


def _stage(
    u: _Unit, cfg: PTQConfig, recipe: ReconRecipe, generator, learn_w: bool, learn_a: bool, last: float
) -> float:
    """One stage of `cfg.iters` Adam steps with cosine decay; returns its last loss (`last` when it has nothing to
    learn)."""
    params = []
    if learn_w:
        params.append({"params": [m.wq.v for m in u.layers], "lr": cfg.lr_w})
    if learn_a and u.lsq:
        params.append({"params": [q.log_scale for q in u.lsq], "lr": cfg.lr_a})
    if not params or not any(g["params"] for g in params):
        return last
    for m in u.layers:
        m.wq.hard = not learn_w
    opt = torch.optim.Adam(params)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.iters, eta_min=0.0)
    rows = u.fp_in[2]
    for it in range(cfg.iters):
        idx = torch.randperm(rows, generator=generator)[: cfg.batch_size]
        loss = _step_loss(u, recipe, _pick(u.fp_in, idx, rows), _pick(u.q_in, idx, rows), learn_a)
        last = float(loss.detach())  # reported: the reconstruction loss, without the regulariser
        if learn_w and cfg.round_reg > 0:
            beta = beta_schedule(it, cfg.iters)
            if beta is not None:
                loss = loss + cfg.round_reg * sum(m.wq.regularizer(beta) for m in u.layers)
        if not torch.isfinite(loss):
            raise QuantuneError("the reconstruction loss became NaN/inf: lower --lr-w / --lr-a or use minmax")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return last


def _step_loss(u: _Unit, recipe: ReconRecipe, fp_batch, q_batch, learn_a: bool) -> torch.Tensor:
    """The FP target, then the quantized unit's loss on one batch (QDrop-mixed inputs when recipe.qdrop > 0)."""
    (args_fp, kwargs_fp), (args_q, kwargs_q) = fp_batch, q_batch
    with torch.no_grad():
        set_quant(u.module, False)
        target = _outputs(u.module(*args_fp, **kwargs_fp))
        inner_fp = u.inner.take() if u.inner else []
    set_quant(u.module, True)
    for q in u.lsq:
        q.enabled = learn_a
        q.qdrop = recipe.qdrop
    if recipe.qdrop > 0:
        args_q, kwargs_q = _qdrop_mix((args_fp, kwargs_fp), (args_q, kwargs_q), recipe.qdrop)
    out = _outputs(u.module(*args_q, **kwargs_q))
    return fbr_loss(out, target, u.inner.take() if u.inner else [], inner_fp, recipe.add_loss)
