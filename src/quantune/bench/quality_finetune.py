"""Table 4b, fine-tuning quality by the IntLoRA reference's protocol (IntLoRA's Table 1 layout), on zoo:emoji
(QUANTUNE_FT_MODEL=zoo:emoji-dit: quality_finetune_emoji_dit): does IntLoRA keep more of a subject than QLoRA + PTQ?

Protocol (configs/emoji_intlora_protocol.toml, the reference's settings scaled to the zoo models): DreamBooth of a
subject the model never saw, denoiser only (no text-encoder LoRA: the subject cannot hide there), the family's
attention projections only, rank 4, constant learning rate swept over `lrs` with the same steps for every method,
prior preservation; quantized methods quantize every other denoiser layer too, activations at 8 bits. Rows: the
float LoRA; QLoRA + PTQ by three re-quantizations that bracket the paper's unstated one; IntLoRA-MUL / -SHIFT,
faithful (the reference's zero-drop) and mid-rise (quantune's fix), at W8A8 and W4A8. Each (method, bits, lr,
subject, seed) trains in its own process (finetune_runs.py: what is scored, and how) and is written to
OUT/cells/NAME/ when it finishes, so a stopped run continues where it was.

Figures are mean +- sd over the (subject, seed) units; p: a paired sign-flip test of the final subject similarity
against IntLoRA-MUL's at the same bits and lr, on the same units. Per-layer IntLoRA diagnostics (means over the
units) go to NAME_layers.csv.

    python -m quantune.bench.quality_finetune [--quick] --out DIR
    QUANTUNE_FT_SETTINGS="lrs=2e-4,subjects=2,seeds=3,workers=2" ...  # a stated subset, in the caption
"""

from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from quantune.bench.cells import CellCache
from quantune.bench.common import Plot, Table, model_table_name, override, run_child, table_main
from quantune.bench.finetune_runs import (
    CONFIG,
    DIAGNOSTICS,
    GRID_COLUMNS,
    PROMPT,
    SUBJECTS,
    Context,
    Protocol,
    label_of,
    rgb,
    run_one,
    slug,
)
from quantune.bench.quality_ptq import fid_notes, grid_strip, prompts_and_reference
from quantune.bench.stats import format_ms, mean_sd, paired_p

logger = logging.getLogger(__name__)
RUNS = [("qlora", "none"), ("intlora-mul", "none"), ("intlora-mul", "midrise"), ("intlora-shift", "none"),
        ("intlora-shift", "midrise")]  # fmt: skip  # at each bits; the float LoRA once per lr
MODEL_VARIABLE = "QUANTUNE_FT_MODEL"
SETTINGS_VARIABLE = "QUANTUNE_FT_SETTINGS"
REFERENCE = "IntLoRA-MUL"  # the paper's method: each row's paired test is against it
METRICS = {"subject_similarity": 4, "subject_gain": 4, "best_similarity": 4, "glyph_top1": 3, "glyph_top5": 3,
           "fid_vs_openmoji": 2, "merge_error": 4, "zero_share": 4, "aux_ratio": 3, "u_clipped": 4,
           "train_s": 0}  # fmt: skip


def protocol(quick: bool) -> Protocol:
    model = os.environ.get(MODEL_VARIABLE, "zoo:emoji")
    p = Protocol(model, 20, 16, 4, 8, 4.0, 8, 4, "1e-3", 1, 1, "W4A8") if quick else Protocol(model)
    return override(p, os.environ.get(SETTINGS_VARIABLE, ""), SETTINGS_VARIABLE)


def plan(p: Protocol) -> list[tuple]:
    """(method, bits, zero fix, lr, subject, seed) of every run the table holds, in the order they run."""
    runs = [("lora", "FP32", "none")] + [(m, b, z) for b in p.bits_list() for m, z in RUNS]
    return [(*r, lr, subject, seed) for lr in p.lr_list() for seed in range(p.seeds)
            for subject in range(p.subjects) for r in runs]  # fmt: skip


def key_of(spec: tuple) -> str:
    method, bits, zero_fix, lr, subject, seed = spec
    return f"lr{lr:g}_subject{subject}_s{seed}_{method}_{bits}_{zero_fix}"


def cell(cache: CellCache, p: Protocol, spec: tuple, tmp: Path) -> dict:
    """One run, from the cache or trained and scored in its own process (one thread); for the first subject and
    seed the subject samples of each model are kept next to the cell for the grid."""

    from quantune.io import make_grid

    key = key_of(spec)
    row = cache.get(key)
    if row is not None:
        return row
    work, start = tmp / key, time.time()
    work.mkdir(parents=True)
    row = run_child("quantune.bench.quality_finetune", ["--one", json.dumps(p.shared()), *spec, work, 1])
    if spec[4] == 0 and spec[5] == 0:
        cache.folder.mkdir(parents=True, exist_ok=True)
        for label in row["models"]:
            images = [rgb(f) for f in sorted((work / "grid" / label).glob("*.png"))]
            make_grid([images]).save(cache.folder / f"{key}__{slug(label)}.png")
    cache.put(key, row, seconds=time.time() - start)
    return row


def run_cells(cache: CellCache, p: Protocol, specs: list[tuple], tmp: Path) -> dict[tuple, dict]:
    """Every run, `p.workers` at a time (each child on one thread)."""
    with ThreadPoolExecutor(p.workers) as pool:
        futures = {spec: pool.submit(cell, cache, p, spec, tmp) for spec in specs}
        return {spec: f.result() for spec, f in futures.items()}


def base_row(cache: CellCache, p: Protocol, tmp: Path) -> dict:
    """The model before fine-tuning, scored like every row (subject similarity against each subject's images);
    its subject samples kept for the grid's first row."""

    from quantune.io import make_grid

    row = cache.get("base")
    if row is None:
        work, start = tmp / "base", time.time()
        row = run_child("quantune.bench.quality_finetune", ["--one", json.dumps(p.shared()), "base", "FP32",
                                                            "none", 0.0, 0, 0, work, 2])  # fmt: skip
        cache.folder.mkdir(parents=True, exist_ok=True)
        images = [rgb(f) for f in sorted((work / "grid" / "base").glob("*.png"))]
        make_grid([images]).save(cache.folder / "base.png")
        cache.put("base", row, seconds=time.time() - start)
    return row


def _base(p: Protocol, work: Path) -> dict:
    """The un-tuned model's figures: retention, and the similarity of its samples of the prompt to each subject."""
    from quantune.demo import instance_images
    from quantune.eval import subject_similarity
    from quantune.models import load_pipeline

    pipe = load_pipeline(p.model)
    ctx = Context(p, work, [], *prompts_and_reference(p.n))
    row = ctx.evaluate(pipe, "base", subject=False)
    images = [rgb(f) for f in sorted((work / "grid" / "base").glob("*.png"))]
    per = [subject_similarity(images, [rgb(f) for f in instance_images(work / f"instance{i}", s)])
           for i, s in enumerate(SUBJECTS)]  # fmt: skip
    return row | {"per_subject": per}


def class_images(p: Protocol, folder: Path) -> None:
    """DreamBooth's prior-preservation images, made once by the base model as the trainer would (every run
    shares them; none of the runs' times includes making them)."""
    from quantune.models import load_pipeline
    from quantune.train.config import resolve_config
    from quantune.train.data import ensure_class_images

    d = resolve_config(str(CONFIG), []).data
    pipe = load_pipeline(p.model)
    pipe.set_progress_bar_config(disable=True)
    ensure_class_images(pipe, folder, d.class_prompt, d.num_class_images, d.resolution, 0)


def summarize(p: Protocol, done: dict[tuple, dict], base: dict) -> list[dict]:
    """One row per (lr, bits, model): mean +- sd over the units, the paired test against IntLoRA-MUL; the gain:
    each unit's subject similarity less the un-tuned model's for that subject."""
    groups: dict[tuple, dict] = {}
    for (_, bits, _, lr, subject, seed), row in done.items():
        for label, figures in row["models"].items():
            unit = figures | _diagnostics(row.get("layers")) | {"train_s": row["train_s"]}
            unit["subject_gain"] = figures["subject_similarity"] - base["per_subject"][subject]
            unit["best_similarity"] = (figures.get("best") or {}).get("subject_similarity", float("nan"))
            groups.setdefault((lr, bits, label), {})[(subject, seed)] = unit
    rows = []
    for (lr, bits, label), units in groups.items():
        out = {"lr": lr, "bits": bits, "model": label, "units": len(units)}
        for k, digits in METRICS.items():
            values = [u.get(k, float("nan")) for u in units.values()]
            out[k], out[f"{k}_sd"] = mean_sd(values)
            out[f"{k}_ms"] = format_ms(values, digits)
        ref = groups.get((lr, bits, REFERENCE), {})
        shared = sorted(set(units) & set(ref))
        if label != REFERENCE and shared:
            out["p"] = paired_p([units[u]["subject_similarity"] for u in shared],
                                [ref[u]["subject_similarity"] for u in shared])  # fmt: skip
        rows.append(out)
    return rows


def _diagnostics(layers: dict | None) -> dict:
    if not layers:
        return {}
    return {k: sum(d[k] for d in layers.values()) / len(layers) for k in DIAGNOSTICS}


def write_layers(path: Path, done: dict[tuple, dict]) -> None:
    """IntLoRA's per-layer diagnostics, the mean over the units of each (lr, bits, model, layer)."""
    acc: dict[tuple, list[dict]] = {}
    for (method, bits, zero_fix, lr, *_), row in done.items():
        for layer, d in (row.get("layers") or {}).items():
            acc.setdefault((lr, bits, label_of(method, zero_fix), layer), []).append(d)
    if not acc:
        return
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["lr", "bits", "model", "layer", "units", *DIAGNOSTICS])
        for (lr, bits, label, layer), ds in acc.items():
            means = [sum(d[k] for d in ds) / len(ds) for k in DIAGNOSTICS]
            w.writerow([lr, bits, label, layer, len(ds), *(f"{m:.6g}" for m in means)])


def grid(cache: CellCache, p: Protocol, specs: list[tuple], out: Path, name: str) -> str:
    """Rows: each model of the first lr's first subject and seed, in table order; columns: its subject samples."""
    from PIL import Image

    from quantune.io import make_grid

    keys = ["base"]
    for spec in specs:
        if spec[3] == p.lr_list()[0] and spec[4] == spec[5] == 0:
            keys += [f"{key_of(spec)}__{slug(label)}" for label in cache.get(key_of(spec))["models"]]
    strips = [grid_strip(cache, k) for k in keys]
    path = out / "grids" / f"{name.replace('quality_', '')}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    width = max(len(s) for s in strips)
    make_grid(strips).resize((width * 64, len(strips) * 64), Image.NEAREST).save(path)
    return str(path.relative_to(out))


def table(quick: bool, out: Path) -> Table:
    p = protocol(quick)
    name = model_table_name("quality_finetune", p.model)
    cache = CellCache(out / "cells" / name, p.cell_settings() | {"quick": quick})
    specs = plan(p)
    with tempfile.TemporaryDirectory() as tmp:
        class_images(p, Path(tmp) / "class_images")
        base = base_row(cache, p, Path(tmp))
        done = run_cells(cache, p, specs, Path(tmp))
    rows = [{"lr": "-", "bits": "FP32", "model": f"{p.model}, no fine-tuning", "units": p.subjects,
             **{f"{k}_ms": format_ms([base[k]], d) for k, d in METRICS.items() if k in base},
             "subject_similarity_ms": format_ms(base["per_subject"][: p.subjects], 4)}]  # fmt: skip
    rows += summarize(p, done, base)
    write_layers(out / f"{name}_layers.csv", done)
    images = [grid(cache, p, specs, out, name)]
    return Table(name, caption(p), COLUMNS, rows,
                 Plot("{lr} {bits} {model}", {"subject similarity (final)": "subject_similarity",
                                              "FID vs OpenMoji": "fid_vs_openmoji"}),
                 notes=fid_notes(p.n) + notes(p), images=images, earlier=cache.earlier())  # fmt: skip


def caption(p: Protocol) -> str:
    full = Protocol(p.model)
    subset = [f"{k} {getattr(p, k)} of {getattr(full, k)}" for k in ("lrs", "subjects", "seeds", "bits")
              if getattr(p, k) != getattr(full, k)]  # fmt: skip
    return (f"DreamBooth on {p.model} by the IntLoRA reference's protocol: {p.steps} steps, rank 4, attention "
            f"projections, denoiser only, constant lr; {p.subjects} subjects x {p.seeds} seeds; integer models "
            "merged, reloaded and sampled (float LoRA: loaded by diffusers); "
            f"subject similarity of {p.n_subject} samples, retention on {p.n} OpenMoji captions"
            + (f"; a stated subset: {', '.join(subset)}" if subset else ""))  # fmt: skip


COLUMNS = {"lr": "{lr}", "bits": "{bits}", "model": "{model}", "units": "{units}",
           "subject similarity, final": "{subject_similarity_ms}", "gain over the base": "{subject_gain_ms}",
           "best of 10 states (by the test metric)": "{best_similarity_ms}",
           f"p (final vs {REFERENCE})": "{p:.3g}", "top-1": "{glyph_top1_ms}", "top-5": "{glyph_top5_ms}",
           "FID vs OpenMoji": "{fid_vs_openmoji_ms}", "merge error / update": "{merge_error_ms}",
           "zero-dropped": "{zero_share_ms}", "|R*| / |W|": "{aux_ratio_ms}", "U clipped": "{u_clipped_ms}",
           "train (s)": "{train_s_ms}"}  # fmt: skip


def notes(p: Protocol) -> list[str]:
    return [
        f"subjects: {', '.join(SUBJECTS[: p.subjects])} (OpenMoji ids; none among the pretraining captions); "
        f"prompt {PROMPT!r}; units: (subject, seed) pairs; subject similarity: the OpenMoji feature network's "
        "cosine to the 4 instance views (a DINO-style metric); retention: top-1 / top-5 glyph recognition and FID "
        "of the OpenMoji captions after fine-tuning",
        "gain over the base: each unit's final subject similarity less the un-tuned model's for the same subject "
        "(the subjects start far apart); best of 10 states: the highest subject similarity over the run's 9 "
        "checkpoints (every tenth of the steps) and its final state: the reference's selection by the test "
        "metric, optimistic; none for the EDA-DM baseline (a PTQ run per checkpoint)",
        "QLoRA rows share one training run per unit, put back into an integer model three ways: W_q + B A "
        "re-quantized with one min-max scale per tensor; re-quantized per output channel with the L2.4 search "
        "(quantune's `qlora merge`); B A added to the float weights, then EDA-DM "
        f"({p.calib_samples} calibration trajectories, {p.iters} iterations per block)",
        "merge error / update: |W_merged - W_train| / |W_train - W_base| over the adapted layers (0: the merged "
        "integer model is the trained one); IntLoRA diagnostics, means over layers and units (per layer: the "
        "_layers.csv): zero-dropped, the share of W_int = 0 (R* + B A lost there); |R*| / |W|; U clipped, the "
        "share of U outside its grid at the end (MUL: codes clamped; SHIFT: exponents below k_max - span)",
        f"p: two-sided sign-flip permutation test of the final subject similarity against {REFERENCE} at the same "
        "bits and lr, paired by unit (its smallest possible value is 2 / 2^units); none for the float LoRA",
        f"{p.workers} run(s) at a time, each on one thread: train (s) is comparable within this table only; "
        "integer models sampled on the torch backend's integer kernels",
        f"grid rows: the un-tuned model, then the first lr's first subject and seed, each model in table order "
        f"({min(GRID_COLUMNS, p.n_subject)} samples of the prompt)",
    ]


def _one(shared, method, bits, zero_fix, lr, subject, seed, work, threads) -> dict:
    import torch

    torch.set_num_threads(int(threads))
    p = Protocol(**json.loads(shared))
    if method == "base":
        return _base(p, Path(work))
    return run_one(p, method, bits, zero_fix, float(lr), int(subject), int(seed), Path(work))


def main() -> None:
    table_main(__doc__, table, _one, 9)


if __name__ == "__main__":
    main()
