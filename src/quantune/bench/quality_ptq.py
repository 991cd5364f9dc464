"""Table 4a, PTQ quality on zoo:emoji (or any text-to-image pipeline: QUANTUNE_PTQ_MODEL=REF, e.g. a diffusion
transformer's folder): FP against minmax / qdiffusion / eda-dm x W8A8 / W4A8 (EDA-DM's Table 1 layout), with the
cost of each.

Each PTQ run is its own process: quantize the model (`quantune.quantize_pipeline`), save the integer model, load it
back (integer kernels prepared, as a user would) and generate the same prompts and seeds as the FP model. Figures:
FID against the FP model's samples and against the OpenMoji glyphs of the prompts (quantune's OpenMoji feature
network), PSNR / SSIM of each sample against the FP sample of the same prompt and seed, the denoiser's size on disk,
and the PTQ run's wall time and peak memory. A grid (rows: FP then each run; columns: the first prompts) is saved.

Each variant runs at `Settings.seeds` calibration seeds (mean +- sd in the table, and a paired permutation test of
the per-image PSNR against eda-dm's); every finished (variant, bits, seed) cell is written to OUT/cells/NAME/ at
once, so a stopped run continues where it was. zoo:emoji's table is quality_ptq, another model's
quality_ptq_<model> (e.g. QUANTUNE_PTQ_MODEL=zoo:emoji-dit: quality_ptq_emoji_dit, with the smoothed eda-dm row).

    python -m quantune.bench.quality_ptq [--quick] --out DIR
    QUANTUNE_PTQ_SETTINGS="calib_samples=64,iters=100" ...  # a smaller run, stated in the table's caption
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from quantune.bench.cells import CellCache
from quantune.bench.common import Plot, Table, model_table_name, override, rss_peak_mb, run_child, table_main
from quantune.bench.stats import format_ms, mean_sd, paired_p

logger = logging.getLogger(__name__)
BITS = {"W8A8": (8, 8), "W4A8": (4, 8)}
METHODS = ["minmax", "qdiffusion", "eda-dm", "eda-dm-reference"]
SMOOTHED = "eda-dm smoothed"  # eda-dm with SmoothQuant (alpha 0.5), on diffusion transformers
# NNCF (OpenVINO's PTQ) of the same float model at W8A8 on the same calibration data: its defaults, and model_type
# TRANSFORMER (SmoothQuant on); it has no W4A8 (its INT4 is weight compression with float activations)
NNCF = {"nncf": False, "nncf smoothquant": True}
GRID_COLUMNS = 8
MODEL_VARIABLE = "QUANTUNE_PTQ_MODEL"  # the pipeline the table quantizes (default zoo:emoji)
# a smaller run than the full protocol, stated in the table's caption: e.g. "n=100,calib_samples=64,iters=100"
SETTINGS_VARIABLE = "QUANTUNE_PTQ_SETTINGS"


@dataclass
class Settings:
    n: int  # prompts (samples per model)
    steps: int  # DDIM steps of sampling and of the calibration trajectories
    calib_samples: int
    iters: int
    guidance: float = 4.0
    model: str = "zoo:emoji"  # any text-to-image pipeline reference
    seeds: int = 3  # calibration seeds per variant (PTQConfig.seed 0 .. seeds - 1)

    def args(self) -> list:
        return [self.n, self.steps, self.calib_samples, self.iters, self.guidance, self.model]


def settings(quick: bool) -> Settings:
    model = os.environ.get(MODEL_VARIABLE, "zoo:emoji")
    s = Settings(24, 10, 16, 10, model=model, seeds=1) if quick else Settings(200, 20, 128, 200, model=model)
    return override(s, os.environ.get(SETTINGS_VARIABLE, ""), SETTINGS_VARIABLE)


def prompts_and_reference(n: int, draw: int = 0) -> tuple[list[str], list]:
    """n OpenMoji captions drawn with seed 0 and their glyphs (FID's reference), the held-out subject excluded;
    `draw` 1 gives the next n glyphs of the same permutation (real images against real images: FID's scale)."""
    from quantune.data import openmoji_dataset

    data = openmoji_dataset(size=32, subset="^(?!.*unicorn)")
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[draw * n : (draw + 1) * n].tolist()
    return [data.captions[i] for i in pick], [data[i]["image"] for i in pick]


def fid_notes(n: int) -> list[str]:
    if n > 128:
        return []
    return [f"FID from {n} images with 128 feature dimensions: biased upwards (rank-deficient covariances), compare "
            "rows of this table only"]  # fmt: skip


def samples(pipe, prompts: list[str], s: Settings) -> list:
    """Image i from seed i (as `quantune eval`): pairs across models."""
    from quantune.eval.run import EvalConfig, sample_images

    pipe.set_progress_bar_config(disable=True)
    return sample_images(pipe, prompts, EvalConfig(steps=s.steps, guidance_scale=s.guidance, batch=50))


def run_nncf(s: Settings, method: str, work: Path, seed: int = 0) -> dict:
    """NNCF's W8A8 of the float denoiser on quantune's uniform calibration set (the same trajectories, prompts and
    steps as minmax / qdiffusion), run by OpenVINO inside the pipeline: images into `work`, stats returned."""
    from quantune.bench.openvino_peer import nncf_converter
    from quantune.data.prompts import default_prompts
    from quantune.errors import QuantuneError
    from quantune.families import family_of
    from quantune.models import load_pipeline
    from quantune.ptq import PTQConfig
    from quantune.ptq.calib import collect_calibration
    from quantune.quant.ov_runtime import OpenVINOModule

    start = time.time()
    pipe = load_pipeline(s.model)
    family = family_of(pipe)
    cfg = PTQConfig(
        method="minmax", calib_samples=s.calib_samples, steps=s.steps, guidance_scale=s.guidance, seed=seed
    )
    calib, _ = collect_calibration(pipe, cfg.for_family(family), default_prompts())
    items = list(calib.batches(2, on_device=False))  # one sampler call's rows (unconditional, conditional)
    model = family.denoiser_of(pipe).eval().requires_grad_(False)
    fp32_bytes = sum(t.numel() * 4 for t in model.state_dict().values())
    runner = OpenVINOModule(model, converter=nncf_converter(items, NNCF[method]))
    setattr(pipe, family.denoiser, runner)
    images = samples(pipe, prompts_and_reference(s.n)[0], s)  # the first call converts and quantizes
    if runner.calls["torch"] or not runner.calls["openvino"]:  # the row would be the float model's
        raise QuantuneError(f"NNCF's model did not run ({runner.calls}): see the warning above")
    for i, im in enumerate(images):
        im.save(work / f"{i:04d}.png")
    return {"ptq_seconds": time.time() - start, "peak_mb": rss_peak_mb(), "unet_mb": float("nan"),
            "fp32_unet_mb": fp32_bytes / 2**20}  # fmt: skip


def run_one(s: Settings, variant: str, bits: str, work: Path, seed: int = 0) -> dict:
    """Quantize the model (calibration seed `seed`), save, reload, generate: images into `work`, stats returned."""
    from quantune.families import family_of
    from quantune.models import load_pipeline
    from quantune.ptq import PTQConfig, quantize_pipeline, save_ptq_pipeline

    if variant in NNCF:
        return run_nncf(s, variant, work, seed)
    method, smooth = variants("transformer", bits)[variant]  # the smoothed row is eda-dm with SmoothQuant
    start = time.time()
    pipe = load_pipeline(s.model)
    wbits, abits = BITS[bits]
    cfg = PTQConfig(method=method, wbits=wbits, abits=abits, calib_samples=s.calib_samples, steps=s.steps,
                    iters=s.iters, guidance_scale=s.guidance, seed=seed, smooth=smooth)  # fmt: skip
    report = quantize_pipeline(pipe, cfg, progress=False)
    seconds, peak = time.time() - start, rss_peak_mb()  # PTQ runs on the CPU
    out = save_ptq_pipeline(pipe, work / "model", report)
    unet_bytes = sum(p.stat().st_size for p in (out / family_of(pipe).denoiser).glob("*.safetensors"))
    pipe = load_pipeline(str(out))
    for i, im in enumerate(samples(pipe, prompts_and_reference(s.n)[0], s)):
        im.save(work / f"{i:04d}.png")
    return {"ptq_seconds": seconds, "peak_mb": peak, "unet_mb": unet_bytes / 2**20,
            "fp32_unet_mb": report["fp32_unet_bytes"] / 2**20}  # fmt: skip


METRICS = {"fid_vs_fp": 2, "fid_vs_openmoji": 2, "psnr_db": 1, "ssim": 3, "glyph_top1": 3, "glyph_top5": 3}  # digits


def scores(images, fp_images, reference, prompts: list[str]) -> dict:
    """FID vs the FP samples, PSNR / SSIM against them (the mean and, for the paired test, each image's PSNR), and
    FID vs the OpenMoji glyphs and glyph recognition when `reference` is given (a model trained on the glyphs)."""
    from quantune.eval import fid, glyph_recognition
    from quantune.eval.metrics import psnr, ssim

    each = psnr(images, fp_images)
    out = {"fid_vs_fp": fid(images, fp_images), "psnr_db": sum(each) / len(each), "psnr_each": each,
           "ssim": sum(q := ssim(images, fp_images)) / len(q)}  # fmt: skip
    if reference is None:
        return out
    return out | {"fid_vs_openmoji": fid(images, reference)} | glyph_recognition(images, prompts)


def variants(denoiser: str, bits: str) -> dict[str, tuple[str, float | None]]:
    """The table's variants at `bits`: name -> (method, SmoothQuant alpha); the smoothed one on transformers only,
    NNCF's at W8A8 when installed."""
    out = {m: (m, None) for m in METHODS}
    if denoiser == "transformer":
        out[SMOOTHED] = ("eda-dm", 0.5)
    if bits == "W8A8" and _nncf_installed():
        out |= {name: (name, None) for name in NNCF}
    return out


def cell(cache: CellCache, s: Settings, variant: str, bits: str, seed: int, fp: tuple) -> dict:
    """One variant at one calibration seed, from the cache or run in its own process and scored; the first grid
    columns of seed 0 are kept next to the cell for the sample grid."""
    from PIL import Image

    from quantune.io import make_grid

    key = f"{bits}_{variant.replace(' ', '-')}_s{seed}"
    row = cache.get(key)
    if row is not None:
        return row
    fp_images, reference, prompts = fp
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        stats = run_child("quantune.bench.quality_ptq", ["--one", variant, bits, seed, tmp, *s.args()])
        images = [Image.open(f).convert("RGB") for f in sorted(Path(tmp).glob("*.png"))]
    row = {**scores(images, fp_images, reference, prompts), **stats}
    if seed == 0:
        cache.folder.mkdir(parents=True, exist_ok=True)
        make_grid([images[:GRID_COLUMNS]]).save(cache.folder / f"{key}.png")
    cache.put(key, row, seconds=time.time() - start)
    return row


def summary(bits: str, variant: str, cells: list[dict], baseline: list[dict] | None) -> dict:
    """Mean and sd over the seeds of each figure; `p_psnr`: the paired test of the per-image PSNR (averaged over
    seeds) against the baseline's (eda-dm at the same bits)."""
    out = {"bits": bits, "method": variant, "seeds": len(cells)}
    for key, digits in METRICS.items():
        values = [c.get(key, float("nan")) for c in cells]
        out[key], out[f"{key}_sd"] = mean_sd(values)
        out[f"{key}_ms"] = format_ms(values, digits)
    for key in ("unet_mb", "fp32_unet_mb", "ptq_seconds", "peak_mb"):
        out[key] = mean_sd([c[key] for c in cells])[0]
    if baseline:
        out["p_psnr"] = paired_p(_per_image(cells), _per_image(baseline))
    return out


def _per_image(cells: list[dict]) -> list[float]:
    return [sum(v) / len(v) for v in zip(*(c["psnr_each"] for c in cells))]


def fp_row(fp_images, reference, prompts) -> dict:
    row = {"bits": "FP32", "method": "-", "seeds": 1, **scores(fp_images, fp_images, reference, prompts)}
    return row | {f"{k}_ms": format_ms([row.get(k, float("nan"))], d) for k, d in METRICS.items()}


def table_name(model: str) -> str:
    """quality_ptq for zoo:emoji (its name since the first table), quality_ptq_<model> for any other."""
    return model_table_name("quality_ptq", model)


def table(quick: bool, out: Path) -> Table:
    from quantune.families import family_of
    from quantune.models import load_pipeline

    s = settings(quick)
    name = table_name(s.model)
    prompts, reference = prompts_and_reference(s.n)
    fp_pipe = load_pipeline(s.model)
    sampler = type(fp_pipe.scheduler).__name__.removesuffix("Scheduler")
    denoiser = family_of(fp_pipe).denoiser
    fp_images = samples(fp_pipe, prompts, s)
    reference = reference if s.model.startswith("zoo:emoji") else None  # FID vs glyphs: models trained on them
    cache = CellCache(out / "cells" / name, {"model": s.model, **asdict(s)} | {"quick": quick})
    rows, strips = [fp_row(fp_images, reference, prompts)], [fp_images[:GRID_COLUMNS]]
    for bits in BITS:
        runs = {v: [cell(cache, s, v, bits, seed, (fp_images, reference, prompts)) for seed in range(s.seeds)]
                for v in variants(denoiser, bits)}  # fmt: skip
        for variant, cells in runs.items():
            rows.append(summary(bits, variant, cells, runs["eda-dm"] if variant != "eda-dm" else None))
            strips.append(grid_strip(cache, f"{bits}_{variant.replace(' ', '-')}_s0"))
    rows[0].update(unet_mb=rows[1]["fp32_unet_mb"], ptq_seconds=0.0)
    if reference is not None:  # n other real glyphs against the reference glyphs: FID's scale
        rows.insert(0, {"bits": "OpenMoji", "method": "other glyphs", "fid_vs_openmoji_ms":
                        format_ms([fid_of_glyphs(s.n, reference)], 2)})  # fmt: skip
    for r in rows:
        r.update(n=s.n, steps=s.steps, calib_samples=s.calib_samples, iters=s.iters)
    grid = out / "grids" / f"{name.replace('quality_', '')}.png"
    _save_grid(strips, grid)
    return Table(name, f"PTQ of {s.model}: {s.n} prompts, {sampler} {s.steps} steps, guidance {s.guidance}; "
                 f"calibration {s.calib_samples} trajectories, {s.iters} iterations per block; mean ± sd over "
                 f"{s.seeds} calibration seeds", COLUMNS, rows,
                 Plot("{bits} {method}", {"FID vs OpenMoji": "fid_vs_openmoji", "FID vs FP": "fid_vs_fp",
                                          "PSNR vs FP (dB)": "psnr_db"}),
                 notes=fid_notes(s.n) + NOTES, images=[str(grid.relative_to(out))],
                 earlier=cache.earlier())  # fmt: skip


COLUMNS = {"bits": "{bits}", "method": "{method}", "FID vs FP": "{fid_vs_fp_ms}",
           "FID vs OpenMoji": "{fid_vs_openmoji_ms}", "PSNR vs FP (dB)": "{psnr_db_ms}",
           "p (PSNR vs eda-dm)": "{p_psnr:.3g}", "SSIM vs FP": "{ssim_ms}", "top-1": "{glyph_top1_ms}",
           "top-5": "{glyph_top5_ms}", "denoiser on disk (MB)": "{unet_mb:.2f}", "PTQ time (s)": "{ptq_seconds:.0f}",
           "PTQ peak RSS (MB)": "{peak_mb:.0f}"}  # fmt: skip
NOTES = [
    "FID with quantune's OpenMoji feature network; the FP row's FID vs FP is 0 by construction and its PSNR is "
    "capped at 99 dB; top-1 / top-5: glyph recognition of each prompt's glyph by the same network",
    "the OpenMoji row gives FID's scale: n other real glyphs against the reference glyphs (not a floor: the "
    "samples are paired with the reference glyphs by caption, so a model can come closer)",
    "seeds: the calibration set's (PTQConfig.seed: its prompts' noise); sampling uses the same seeds in every row; "
    "p: a two-sided sign-flip permutation test (20,000 draws) of the per-image PSNR, averaged over the seeds, "
    "against eda-dm's at the same bits",
    f"{SMOOTHED!r} (transformers only): eda-dm with SmoothQuant alpha 0.5 before the activation quantizers",
    "grid rows: FP, then each row of the table in order (calibration seed 0)",
    "quantune's rows: the saved integer model loaded with `load_pipeline` and its default backend (OpenVINO on "
    "the CPU when installed); nncf rows: nncf.quantize (defaults; model_type TRANSFORMER with SmoothQuant) of the "
    "float model on the uniform calibration set of minmax / qdiffusion, run by OpenVINO, PTQ time including "
    "sampling; NNCF has no W4A8 (its INT4 is weight-only), no disk size: the model stays in memory",
]


def fid_of_glyphs(n: int, reference) -> float:
    from quantune.eval import fid

    return fid(prompts_and_reference(n, 1)[1], reference)


def grid_strip(cache: CellCache, key: str) -> list:
    """The grid columns kept with a cell, split back into images."""
    from PIL import Image

    strip = Image.open(cache.folder / f"{key}.png").convert("RGB")
    h = strip.height
    return [strip.crop((i * h, 0, (i + 1) * h, h)) for i in range(strip.width // h)]


def _save_grid(strips: list[list], path: Path) -> None:
    from PIL import Image

    from quantune.io import make_grid

    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(strips).resize((GRID_COLUMNS * 64, len(strips) * 64), Image.NEAREST).save(path)


def _nncf_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("nncf") is not None and importlib.util.find_spec("openvino") is not None


def _one(variant, bits, seed, work, n, steps, calib, iters, guidance, model) -> dict:
    s = Settings(int(n), int(steps), int(calib), int(iters), float(guidance), model)
    return run_one(s, variant, bits, Path(work), int(seed))


def main() -> None:
    table_main(__doc__, table, _one, 10)


if __name__ == "__main__":
    main()
