"""`quantune eval`: generate images for a prompt set with a model (and LoRAs), then score them.

Prompts are "builtin" (N OpenMoji captions drawn with the seed, their glyphs the FID reference) or a text file
(one per line; FID then needs --reference DIR). Image i uses the generator seed + i, so two models evaluated with
the same settings make pairs (PSNR / SSIM / LPIPS against --compare-model). Writes, atomically: metrics.json
(the figures and the settings), rows.json and rows.csv (one row per image: prompt, seed, per-image scores),
images/*.png and grid.png.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from quantune.data import openmoji_dataset
from quantune.data.folders import load_rgb
from quantune.data.prompts import read_prompts
from quantune.errors import QuantuneError
from quantune.eval import metrics as M
from quantune.eval.fid import ClipFeatures, fid
from quantune.eval.recognition import check_captions, glyph_ranks, top_k
from quantune.eval.similarity import similarity_per_image
from quantune.families import family_of
from quantune.generate import LoraSpec, attach_loras
from quantune.io import atomic_dir, check_output, make_grid
from quantune.lora.inject import set_lora_multiplier
from quantune.lora.weights import components_of
from quantune.models.deploy import BACKENDS, deploy
from quantune.models.loading import load_pipeline, to_device

logger = logging.getLogger(__name__)
METRICS = ("fid", "glyph", "clip-t", "clip-i", "dino", "lpips", "psnr", "ssim")
PAIRED = ("psnr", "ssim", "lpips")
MARKERS = ("metrics.json",)  # an output folder `evaluate` wrote


@dataclass
class EvalConfig:
    metrics: list[str] = field(default_factory=lambda: ["fid"])
    prompts: str = "builtin"  # "builtin" (OpenMoji captions) or a text file, one prompt per line
    n: int = 64  # builtin: how many captions; a file: its first n prompts (0: all)
    steps: int = 20
    guidance_scale: float = 7.5
    size: int | None = None  # image side in px; None: the model's
    seed: int = 0
    batch: int = 16
    reference: str | None = None  # FID reference images (a folder); builtin prompts: their OpenMoji glyphs
    instance: str | None = None  # subject images for clip-i / dino (a folder)
    compare_model: str | None = None  # the model whose same-seed samples psnr / ssim / lpips compare against
    feature: str = "openmoji"  # FID features: quantune's OpenMoji network, or a local CLIP folder
    clip: str | None = None  # local CLIPModel folder (clip-t, clip-i)
    dino: str | None = None  # local DINO / DINOv2 folder
    backend: str = "auto"  # an integer model's engine (models/deploy.py): auto, openvino, torch

    def __post_init__(self) -> None:
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise QuantuneError(f"unknown metric(s) {unknown}: choose from {', '.join(METRICS)}")
        if self.backend not in BACKENDS:
            raise QuantuneError(f"unknown backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        needs = {
            "fid": ("reference", self.prompts == "builtin" or self.reference, "--reference DIR (FID's real images)"),
            "clip-t": ("clip", self.clip, "--clip DIR (a local CLIPModel)"),
            "clip-i": ("instance", self.instance and self.clip, "--instance DIR and --clip DIR"),
            "dino": ("instance", self.instance and self.dino, "--instance DIR and --dino DIR"),
        }
        for m in self.metrics:
            if m in needs and not needs[m][1]:
                raise QuantuneError(f"metric {m} needs {needs[m][2]}")
            if m in PAIRED and not self.compare_model:
                raise QuantuneError(f"metric {m} compares pairs: pass --compare-model REF (same prompts and seeds)")
        if self.n < 0 or self.steps < 1 or self.batch < 1:
            raise QuantuneError("n must be 0 or more, steps and batch at least 1")
        if "fid" in self.metrics and self.n == 1:
            raise QuantuneError("FID needs at least 2 images: raise --n")


def load_prompts(cfg: EvalConfig) -> tuple[list[str], list | None]:
    """(prompts, FID reference images or None)."""
    if cfg.prompts == "builtin":
        data = openmoji_dataset(size=32)
        n = cfg.n or len(data)
        pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed))[:n].tolist()
        return [data.captions[i] for i in pick], [data[i]["image"] for i in pick]

    prompts = read_prompts(cfg.prompts)
    return prompts[: cfg.n] if cfg.n else prompts, None


def read_images(folder: str | Path) -> list:
    files = sorted(p for p in Path(folder).glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    images = []
    for f in files:
        try:
            images.append(load_rgb(f))  # EXIF rotation, transparency onto white (as training reads images)
        except QuantuneError:
            logger.warning("skipping %s: not a readable image", f)
    if not images:
        raise QuantuneError(f"no readable images (.png/.jpg/.webp) in {folder}: pass a folder of images")
    return images


@torch.no_grad()
def sample_images(pipe, prompts: list[str], cfg: EvalConfig, size: int | None = None) -> list:
    """One image per prompt; image i from torch.Generator seeded cfg.seed + i (pairs across models)."""
    size = size or cfg.size or family_of(pipe).default_size(pipe)
    images = []
    for i in range(0, len(prompts), cfg.batch):
        chunk = prompts[i : i + cfg.batch]
        gens = [torch.Generator().manual_seed(cfg.seed + i + j) for j in range(len(chunk))]
        family = family_of(pipe)
        images += pipe(chunk, num_inference_steps=cfg.steps, height=size, width=size, generator=gens,
                       **family.guidance_kwargs(pipe, cfg.guidance_scale, len(chunk)),
                       **family.call_kwargs(pipe)).images  # fmt: skip
    return images


def score(images, prompts: list[str], cfg: EvalConfig, reference=None, pairs=None) -> tuple[dict, list[dict]]:
    """(figures, per-image rows) for the metrics of `cfg`."""

    figures: dict[str, float] = {}
    rows = [{"index": i, "prompt": p, "seed": cfg.seed + i} for i, p in enumerate(prompts)]
    per_image = {"clip-t": lambda: M.clip_t(images, prompts, cfg.clip), "psnr": lambda: M.psnr(images, pairs),
                 "ssim": lambda: M.ssim(images, pairs), "lpips": lambda: M.lpips(images, pairs)}  # fmt: skip
    for m in cfg.metrics:
        if m == "fid":
            reference = read_images(cfg.reference) if cfg.reference else reference  # --reference wins
            figures[m] = fid(images, reference, cfg.feature)
            continue
        if m == "glyph":  # OpenMoji-network recognition of each prompt's glyph (eval/recognition.py)
            ranks = glyph_ranks(images, prompts)
            for row, r in zip(rows, ranks):
                row["glyph_rank"] = r
            figures.update(top_k(ranks))
            continue
        if m in ("clip-i", "dino"):
            net = ClipFeatures(cfg.clip) if m == "clip-i" else M.DinoFeatures(cfg.dino)
            per_image[m] = lambda net=net: similarity_per_image(images, read_images(cfg.instance), net)
        values = per_image[m]()
        for row, v in zip(rows, values):
            row[m] = v
        figures[m] = sum(values) / len(values)
    return figures, rows


def check_inputs(cfg: EvalConfig, out: str | Path, overwrite: bool = False) -> None:
    """Every folder the metrics read, and the output folder, checked before anything is generated."""
    for name, flag in (("reference", "--reference"), ("instance", "--instance")):
        folder = getattr(cfg, name)
        if folder is not None and not Path(folder).is_dir():
            raise QuantuneError(f"{flag} {folder} is not a folder: pass a folder of images")
    for name, flag in (("clip", "--clip"), ("dino", "--dino")):
        folder = getattr(cfg, name)
        if folder is not None and not (Path(folder) / "config.json").is_file():
            raise QuantuneError(f"{flag} {folder} holds no model (no config.json): pass a local model folder")
    if cfg.feature != "openmoji" and not Path(cfg.feature).exists():
        raise QuantuneError(f"--feature {cfg.feature} not found: use openmoji or a local CLIP folder")
    check_output(out, overwrite, MARKERS)


def evaluate(
    model: str,
    cfg: EvalConfig,
    out: str | Path,
    loras: list[str] | None = None,
    device: str = "cpu",
    overwrite: bool = False,
) -> dict:
    """Generate with `model` (+ `loras`, FILE[:SCALE]) on `device`, score, write the outputs into `out`; returns the
    figures. Inputs are checked first (check_inputs), so a bad folder fails before any image is generated."""

    start = time.time()
    check_inputs(cfg, out, overwrite)
    prompts, reference = load_prompts(cfg)
    if "glyph" in cfg.metrics:
        check_captions(prompts)
    pipe = to_device(load_pipeline(model, backend="torch"), device)  # LoRAs attach to the PyTorch model
    specs = [LoraSpec.parse(s) for s in loras or []]
    if any(len(s.scales) != 1 for s in specs):
        raise QuantuneError("eval takes one scale per LoRA (FILE:SCALE)")
    scales = attach_loras(pipe, specs)
    if specs:
        for component in components_of(pipe).values():
            set_lora_multiplier(component, scales[0])
    deploy(pipe, cfg.backend)
    size = cfg.size or family_of(pipe).default_size(pipe)  # pairs share it
    images = sample_images(pipe, prompts, cfg, size)
    pairs = None
    if cfg.compare_model:
        backend = "torch" if cfg.backend == "torch" else "auto"  # a float comparison model runs in PyTorch
        compare = to_device(load_pipeline(cfg.compare_model, backend="torch"), device, backend)
        pairs = sample_images(compare, prompts, cfg, size)
    figures, rows = score(images, prompts, cfg, reference, pairs)
    result = {"model": model, "loras": loras or [], "n_images": len(images), **figures,
              "seconds": round(time.time() - start, 1), "config": asdict(cfg)}  # fmt: skip
    with atomic_dir(out, MARKERS, overwrite) as tmp:
        (tmp / "images").mkdir()
        for row, image in zip(rows, images):
            row["image"] = f"images/{row['index']:04d}.png"
            image.save(tmp / row["image"])
        side = min(8, len(images))
        make_grid([images[i : i + side] for i in range(0, min(len(images), side * side), side)]).save(tmp / "grid.png")
        (tmp / "metrics.json").write_text(json.dumps(result, indent=1))
        (tmp / "rows.json").write_text(json.dumps(rows, indent=1))
        with open(tmp / "rows.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    logger.info("evaluated %d images in %.0f s: %s", len(images), result["seconds"], figures)
    return result
