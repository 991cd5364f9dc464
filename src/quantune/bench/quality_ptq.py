"""Table 4a, PTQ quality on zoo:emoji (or any text-to-image pipeline: QUANTUNE_PTQ_MODEL=REF, e.g. a diffusion
transformer's folder): FP against minmax / qdiffusion / eda-dm x W8A8 / W4A8 (EDA-DM's Table 1 layout), with the
cost of each.

Each PTQ run is its own process: quantize the model (`quantune.quantize_pipeline`), save the integer model, load it
back (integer kernels prepared, as a user would) and generate the same prompts and seeds as the FP model. Figures:
FID against the FP model's samples and against the OpenMoji glyphs of the prompts (quantune's OpenMoji feature
network), PSNR / SSIM of each sample against the FP sample of the same prompt and seed, the denoiser's size on disk,
and the PTQ run's wall time and peak memory. A grid (rows: FP then each run; columns: the first prompts) is saved.

    python -m quantune.bench.quality_ptq [--quick] --out DIR
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from quantune.bench.common import Plot, Table, rss_peak_mb, run_child, table_main

logger = logging.getLogger(__name__)
BITS = {"W8A8": (8, 8), "W4A8": (4, 8)}
METHODS = ["minmax", "qdiffusion", "eda-dm", "eda-dm-reference"]
# NNCF (OpenVINO's PTQ) of the same float model at W8A8 on the same calibration data: its defaults, and model_type
# TRANSFORMER (SmoothQuant on); it has no W4A8 (its INT4 is weight compression with float activations)
NNCF = {"nncf": False, "nncf smoothquant": True}
GRID_COLUMNS = 8
MODEL_VARIABLE = "QUANTUNE_PTQ_MODEL"  # the pipeline the table quantizes (default zoo:emoji)


@dataclass
class Settings:
    n: int  # prompts (samples per model)
    steps: int  # DDIM steps of sampling and of the calibration trajectories
    calib_samples: int
    iters: int
    guidance: float = 4.0
    model: str = "zoo:emoji"  # any text-to-image pipeline reference

    def args(self) -> list:
        return [self.n, self.steps, self.calib_samples, self.iters, self.guidance, self.model]


def settings(quick: bool) -> Settings:
    model = os.environ.get(MODEL_VARIABLE, "zoo:emoji")
    return Settings(24, 10, 16, 10, model=model) if quick else Settings(200, 20, 128, 200, model=model)


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


def run_nncf(s: Settings, method: str, work: Path) -> dict:
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
    cfg = PTQConfig(method="minmax", calib_samples=s.calib_samples, steps=s.steps, guidance_scale=s.guidance)
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


def run_one(s: Settings, method: str, bits: str, work: Path) -> dict:
    """Quantize the model, save, reload, generate: images into `work`, stats returned."""
    from quantune.families import family_of
    from quantune.models import load_pipeline
    from quantune.ptq import PTQConfig, quantize_pipeline, save_ptq_pipeline

    if method in NNCF:
        return run_nncf(s, method, work)
    start = time.time()
    pipe = load_pipeline(s.model)
    wbits, abits = BITS[bits]
    cfg = PTQConfig(method=method, wbits=wbits, abits=abits, calib_samples=s.calib_samples, steps=s.steps,
                    iters=s.iters, guidance_scale=s.guidance)  # fmt: skip
    report = quantize_pipeline(pipe, cfg, progress=False)
    seconds, peak = time.time() - start, rss_peak_mb()  # PTQ runs on the CPU
    out = save_ptq_pipeline(pipe, work / "model", report)
    unet_bytes = sum(p.stat().st_size for p in (out / family_of(pipe).denoiser).glob("*.safetensors"))
    pipe = load_pipeline(str(out))
    for i, im in enumerate(samples(pipe, prompts_and_reference(s.n)[0], s)):
        im.save(work / f"{i:04d}.png")
    return {"ptq_seconds": seconds, "peak_mb": peak, "unet_mb": unet_bytes / 2**20,
            "fp32_unet_mb": report["fp32_unet_bytes"] / 2**20}  # fmt: skip


def scores(images, fp_images, reference) -> dict:
    """FID vs the FP samples, PSNR / SSIM against them, and FID vs the OpenMoji glyphs when `reference` is given
    (zoo:emoji: another model's images are not comparable with 32 px glyphs)."""
    from quantune.eval import fid
    from quantune.eval.metrics import psnr, ssim

    out = {
        "fid_vs_fp": fid(images, fp_images),
        "psnr_db": sum(p := psnr(images, fp_images)) / len(p),
        "ssim": sum(q := ssim(images, fp_images)) / len(q),
    }
    return out | ({"fid_vs_openmoji": fid(images, reference)} if reference is not None else {})


def table(quick: bool, out: Path) -> Table:
    from PIL import Image

    from quantune.eval import fid
    from quantune.io import make_grid
    from quantune.models import load_pipeline

    s = settings(quick)
    prompts, reference = prompts_and_reference(s.n)
    fp_pipe = load_pipeline(s.model)
    sampler = type(fp_pipe.scheduler).__name__.removesuffix("Scheduler")
    fp_images = samples(fp_pipe, prompts, s)
    emoji = s.model == "zoo:emoji"  # the OpenMoji glyphs are its data: FID against them means something only there
    reference = reference if emoji else None
    floor = None  # n other real glyphs against the reference glyphs: FID's scale
    if emoji:
        floor = {"bits": "OpenMoji", "method": "other glyphs",
                 "fid_vs_openmoji": fid(prompts_and_reference(s.n, 1)[1], reference)}  # fmt: skip
    rows = [{"bits": "FP32", "method": "-", **scores(fp_images, fp_images, reference)}]
    grid = [fp_images[:GRID_COLUMNS]]
    for bits in BITS:
        for method in METHODS + (list(NNCF) if bits == "W8A8" and _nncf_installed() else []):
            with tempfile.TemporaryDirectory() as tmp:
                stats = run_child("quantune.bench.quality_ptq", ["--one", method, bits, tmp, *s.args()])
                images = [Image.open(f).convert("RGB") for f in sorted(Path(tmp).glob("*.png"))]
            rows[0].update(unet_mb=stats["fp32_unet_mb"], ptq_seconds=0.0)
            rows.append({"bits": bits, "method": method, **scores(images, fp_images, reference), **stats})
            grid.append(images[:GRID_COLUMNS])
    (out / "grids").mkdir(parents=True, exist_ok=True)
    make_grid(grid).resize((GRID_COLUMNS * 64, len(grid) * 64), Image.NEAREST).save(out / "grids" / "ptq.png")
    rows = [floor, *rows] if floor is not None else rows
    for r in rows:
        r.update(n=s.n, steps=s.steps, calib_samples=s.calib_samples, iters=s.iters)
    notes = fid_notes(s.n)
    return Table(
        "quality_ptq",
        f"PTQ of {s.model}: {s.n} prompts, {sampler} {s.steps} steps, guidance {s.guidance}; calibration "
        f"{s.calib_samples} trajectories, {s.iters} iterations per block",
        {"bits": "{bits}", "method": "{method}", "FID vs FP": "{fid_vs_fp:.2f}",
         "FID vs OpenMoji": "{fid_vs_openmoji:.2f}", "PSNR vs FP (dB)": "{psnr_db:.1f}", "SSIM vs FP": "{ssim:.3f}",
         "denoiser on disk (MB)": "{unet_mb:.2f}", "PTQ time (s)": "{ptq_seconds:.0f}",
         "PTQ peak RSS (MB)": "{peak_mb:.0f}"},
        rows,
        Plot("{bits} {method}", {"FID vs OpenMoji": "fid_vs_openmoji", "FID vs FP": "fid_vs_fp", "PSNR vs FP (dB)":
                                 "psnr_db"}),
        notes=notes + ["FID with quantune's OpenMoji feature network; the FP row's FID vs FP is 0 by construction and "
               "its PSNR is capped at 99 dB",
               "the OpenMoji row gives FID's scale: n other real glyphs against the reference glyphs (not a floor: "
               "the samples are paired with the reference glyphs by caption, so a model can come closer)",
               "grid rows: FP, then W8A8 minmax / qdiffusion / eda-dm / eda-dm-reference / nncf / nncf smoothquant, "
               "then W4A8 minmax / qdiffusion / eda-dm / eda-dm-reference",
               "quantune's rows: the saved integer model loaded with `load_pipeline` and its default backend "
               "(OpenVINO on the CPU when installed); nncf rows: nncf.quantize (defaults; model_type TRANSFORMER "
               "with SmoothQuant) of the float model on the uniform calibration set of minmax / qdiffusion, run by "
               "OpenVINO, PTQ time including sampling; NNCF has no W4A8 (its INT4 is weight-only), no disk size: "
               "the model stays in memory"],
        images=["grids/ptq.png"],
    )  # fmt: skip


def _nncf_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("nncf") is not None and importlib.util.find_spec("openvino") is not None


def _one(method, bits, work, n, steps, calib, iters, guidance, model) -> dict:
    s = Settings(int(n), int(steps), int(calib), int(iters), float(guidance), model)
    return run_one(s, method, bits, Path(work))


def main() -> None:
    table_main(__doc__, table, _one, 9)


if __name__ == "__main__":
    main()
