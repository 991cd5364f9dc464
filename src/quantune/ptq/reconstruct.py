"""Block reconstruction: BRECQ / Q-Diffusion (block-output loss, AdaRound then step sizes) and EDA-DM's FBR
(Fine-grained Block Reconstruction; arXiv 2401.04585 section 4.2; spec/eda-dm.md).

For a unit (block or lone layer) with FP input X_fp (the float model's) and quantized-model input X_q (the model
with every earlier unit quantized):
    L_FBR = ||B_q(X~) - B_fp(X_fp)||^2 + add_loss * sum_{l in inner layers} ||g_l^q - g_l^fp||^2
where g_l are the outputs of the unit's quantized layers except the last one it calls, ||.||^2 is the squared error
summed over dim 1 and averaged over the rest, and X~ is X_q (Q-Diffusion) or, with QDrop, a per-element random mix
of X_fp and X_q whose activation quantizers each quantize an element with probability 1 - p (EDA-DM).
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

import torch
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
    """Squared error summed over dim 1 and averaged over the rest (the reference's `lp_loss`)."""
    diff = (out.float() - target.float()).pow(2)
    return diff.sum(1).mean() if diff.dim() > 1 else diff.mean()


def fbr_loss(out, target, inner_q: list, inner_fp: list, add_loss: float) -> torch.Tensor:
    """L_FBR = rec(B_q, B_fp) + add_loss * sum of rec(g_l^q, g_l^fp) over the recorded inner layers but the last
    (the last one's output is the block output's source, already in the first term)."""
    loss = rec_loss(out, target)
    if add_loss and len(inner_q) > 1:
        loss = loss + add_loss * sum(rec_loss(a, b) for a, b in zip(inner_q[:-1], inner_fp[:-1]))
    return loss


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


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


def reconstruct_unit(unit, fp_in, q_in, cfg: PTQConfig, generator: torch.Generator) -> float:
    """Reconstruct one unit in place (see the module docstring); returns the last reconstruction loss (FBR or block
    output, without the rounding regulariser)."""
    layers = [m for m in unit.modules() if isinstance(m, PTQLayer)] if not isinstance(unit, PTQLayer) else [unit]
    lsq = [m for m in unit.modules() if isinstance(m, LSQActQuantizer)]
    rows = fp_in[2]
    fbr = cfg.method == "eda-dm"
    inner = _InnerOutputs(layers) if fbr and cfg.add_loss > 0 and len(layers) > 1 else None
    stages = [(True, True)] if fbr else [(True, False), (False, True)]  # (learn weights, learn activations)
    loss_value = float("nan")
    try:
        for learn_w, learn_a in stages:
            params = []
            if learn_w:
                params.append({"params": [m.wq.v for m in layers], "lr": cfg.lr_w})
            if learn_a and lsq:
                params.append({"params": [q.log_scale for q in lsq], "lr": cfg.lr_a})
            if not params or not any(g["params"] for g in params):
                continue
            for m in layers:
                m.wq.hard = not learn_w
            opt = torch.optim.Adam(params)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.iters, eta_min=0.0)
            for it in range(cfg.iters):
                idx = torch.randperm(rows, generator=generator)[: cfg.batch_size]
                args_fp, kwargs_fp = _pick(fp_in, idx, rows)
                args_q, kwargs_q = _pick(q_in, idx, rows)
                with torch.no_grad():
                    set_quant(unit, False)
                    target = _first(unit(*args_fp, **kwargs_fp))
                    inner_fp = inner.take() if inner else []
                set_quant(unit, True)
                for q in lsq:
                    q.enabled = learn_a
                    q.qdrop = cfg.qdrop if fbr else 0.0
                if fbr and cfg.qdrop > 0:
                    args_q, kwargs_q = _qdrop_mix((args_fp, kwargs_fp), (args_q, kwargs_q), cfg.qdrop)
                out = _first(unit(*args_q, **kwargs_q))
                loss = fbr_loss(out, target, inner.take() if inner else [], inner_fp, cfg.add_loss)
                loss_value = float(loss.detach())  # reported: the reconstruction loss, without the regulariser
                if learn_w and cfg.round_reg > 0:
                    beta = beta_schedule(it, cfg.iters)
                    if beta is not None:
                        loss = loss + cfg.round_reg * sum(m.wq.regularizer(beta) for m in layers)
                if not torch.isfinite(loss):
                    raise QuantuneError("the reconstruction loss became NaN/inf: lower --lr-w / --lr-a or use minmax")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    finally:
        if inner:
            inner.close()
        for m in layers:
            m.wq.hard = True
        for q in lsq:
            q.qdrop, q.enabled = 0.0, True
        set_quant(unit, True)
    return loss_value
