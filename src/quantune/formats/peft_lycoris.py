"""peft's LoHa and LoKr adapters (`peft.LoHaConfig`, `peft.LoKrConfig`), converted by hand both ways.

peft names the factors as LyCORIS does ("base_model.model.<path>.hada_w1_a", "...lokr_w1", ...), with the scale
alpha / r from its config (`alpha`, `rank_pattern`, `alpha_pattern`). peft builds the factors' shapes from the config
when it loads (`PeftModel.from_pretrained`), so the writer checks that peft's own rules give every module's shapes:
LoHa's Tucker cores (`use_effective_conv2d`) on every conv with a kernel or none; LoKr's factorization with one
`decompose_factor`, `decompose_both`, and a low-rank W2 exactly where r < max(b, d) / 2. A file peft would build
otherwise is one error line. peft keeps alpha / r when both LoKr factors are full, where LyCORIS uses 1: the reader
folds peft's scale into W1, the writer gives such modules alpha = r.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import torch

from quantune.errors import QuantuneError
from quantune.lora.adapter import AdapterModule
from quantune.lora.loha import LohaModule
from quantune.lora.lokr import LokrModule, factorization
from quantune.targets import pattern_value

TYPES = {"LOHA": LohaModule, "LOKR": LokrModule}
KIND_TO_PEFT = {cls.kind: name for name, cls in TYPES.items()}


def patterns(paths: list[str], ranks: list[int], alphas: list[float], alpha_key: str) -> dict:
    """peft's r / alpha plus the rank_pattern / alpha_pattern that give every module its own exactly."""
    r = Counter(ranks).most_common(1)[0][0]
    alpha = Counter(alphas).most_common(1)[0][0]
    return {
        "r": r,
        alpha_key: alpha,
        "target_modules": sorted(paths),
        "rank_pattern": {re.escape(p): k for p, k in zip(paths, ranks) if k != r},
        "alpha_pattern": {re.escape(p): a for p, a in zip(paths, alphas) if a != alpha},
    }


def read(cfg: dict, groups: dict[str, dict[str, torch.Tensor]], component: str) -> dict[str, AdapterModule]:
    """Canonical modules from peft's LoHa / LoKr tensors grouped by module path."""
    cls = TYPES[cfg["peft_type"]]
    out = {}
    for path, parts in groups.items():
        problem = cls.layout_problem(parts)
        if problem:
            raise QuantuneError(f"{component}.{path}: {problem}: the peft adapter is broken")
        r = int(pattern_value(cfg.get("rank_pattern") or {}, path, cfg.get("r", 8)))
        alpha = float(pattern_value(cfg.get("alpha_pattern") or {}, path, cfg.get("alpha", r)))
        if cls is LokrModule and not LokrModule.low_rank(parts):  # peft: alpha / r; LyCORIS: 1
            first = "lokr_w1"
            parts = {**parts, first: (parts[first].float() * (alpha / r)).to(parts[first].dtype)}
            alpha = float(LokrModule.rank_of(parts))
        out[f"{component}.{path}"] = cls(parts, alpha)
    return out


def config(kind: str, mods: dict[str, AdapterModule], shapes: dict[str, tuple[int, ...]]) -> dict:
    """peft's config for these modules (path -> module, path -> base weight shape), or one error line."""
    paths = list(mods)
    alphas = [m.alpha if m.kind != "lokr" or LokrModule.low_rank(m.parts) else float(m.rank) for m in mods.values()]
    cfg = patterns(paths, [m.rank for m in mods.values()], alphas, "alpha")
    convs = [
        p
        for p in paths
        if len(shapes[p]) == 4 and math.prod(shapes[p][2:]) > 1 and (kind == "loha" or "lokr_w2_b" in mods[p].parts)
    ]  # fmt: skip  (a full LoKr W2 has no core)
    tucker = {any(k in mods[p].parts for k in ("hada_t1", "lokr_t2")) for p in convs}
    if len(tucker) > 1:
        raise QuantuneError(f"some of the {kind} convs have Tucker cores and some not: peft has one "
                            "use_effective_conv2d per adapter; write kohya or quantune")  # fmt: skip
    cfg.update({"peft_type": KIND_TO_PEFT[kind], "use_effective_conv2d": bool(tucker and tucker.pop()),
                "rank_dropout": 0.0, "module_dropout": 0.0, "init_weights": True})  # fmt: skip
    if kind == "lokr":
        cfg.update(_lokr_options(mods, shapes))
    return cfg


def _lokr_options(mods: dict[str, LokrModule], shapes: dict[str, tuple[int, ...]]) -> dict:
    both = any("lokr_w1_a" in m.parts for m in mods.values())
    sizes = sorted({d for m in mods.values() for t in m.parts.values() for d in t.shape[:2]})
    for factor in [-1, *sizes]:
        if all(_peft_builds(m, shapes[p], factor, both) for p, m in mods.items()):
            return {"decompose_both": both, "decompose_factor": factor, "rank_dropout_scale": False}
    raise QuantuneError("peft's LoKr rules (one decompose_factor, decompose_both, W2 low-rank where r < max(b, d) / "
                        "2) do not give these LoKr factors (with --model a conv's kernel is known): write kohya or "
                        "quantune instead")  # fmt: skip


def peft_factorization(dimension: int, factor: int) -> tuple[int, int]:
    """peft's rule: LyCORIS's (lora/lokr.py), except that a factor dividing the dimension comes first even when it
    is the larger of the two."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    return factorization(dimension, factor)


def _peft_builds(mod: LokrModule, shape: tuple[int, ...], factor: int, both: bool) -> bool:
    """Whether peft's LoKr layer for a base of `shape` has exactly this module's factor shapes."""
    (a, b), (c, d) = peft_factorization(shape[0], factor), peft_factorization(shape[1], factor)
    r = mod.rank
    want = {}
    if both and r < max(a, c) / 2:
        want.update({"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)})
    else:
        want["lokr_w1"] = (a, c)
    kernel = tuple(shape[2:])
    if r >= max(b, d) / 2:
        want["lokr_w2"] = (b, d, *kernel)
    elif "lokr_t2" in mod.parts and math.prod(kernel) > 1:
        want.update({"lokr_t2": (r, r, *kernel), "lokr_w2_a": (r, b), "lokr_w2_b": (r, d)})
    else:
        want.update({"lokr_w2_a": (b, r), "lokr_w2_b": (r, d * math.prod(kernel))})
    return want == {k: tuple(t.shape) for k, t in mod.parts.items()}
