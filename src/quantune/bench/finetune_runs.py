"""One training run of the fine-tuning table (quality_finetune.py), in its own process: DreamBooth by the IntLoRA
reference's protocol (configs/emoji_intlora_protocol.toml; docs/intlora.md section 6), then every model it yields.

A run is one method (and bits, zero fix) at one learning rate, subject and seed. What it yields:
- lora: the float LoRA, loaded with diffusers' own `load_lora_weights`;
- qlora: the LoRA trained on the integer base put back into an integer model three ways, the QLoRA + PTQ baselines
  that bracket the IntLoRA paper's unstated one: re-quantized with one min-max scale per tensor; re-quantized per
  output channel with the L2.4 search (quantune's `qlora merge`); merged into the *float* weights, then quantized
  by EDA-DM (W?A8, its own calibration);
- intlora-mul / intlora-shift: the integer product / shift (`intlora merge`: exactly the training weight W').
Every integer model is saved and loaded back (`load_pipeline`, on the torch backend's integer kernels: the same
numbers as the in-memory models of the checkpoints below, and no OpenVINO conversion per model). Metrics:
- subject similarity: the mean cosine of `n_subject` samples of "a sks emoji" to the instance images (the
  OpenMoji feature network: the offline stand-in for DINO / CLIP-I), at the final step; and the best of the run's
  10 states (9 checkpoints, every tenth of the steps, and the final one) by that same test metric (the
  reference's selection: optimistic, reported apart; not for the EDA-DM baseline: a PTQ run per checkpoint);
- retention of the base model: glyph recognition top-1 / top-5 and FID vs OpenMoji of `n` OpenMoji captions;
- merge error |W_merged - W_train| / |W_train - W_base| over the adapted layers of the reloaded model (W_train:
  what the training forward used; W_base: the same with B = 0), and IntLoRA's per-layer diagnostics
  (IntLoraLayer.diagnostics).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from quantune.bench.quality_ptq import BITS, Settings, prompts_and_reference, samples
from quantune.errors import QuantuneError
from quantune.families import family_of
from quantune.train.quant_methods import intlora_layers, requantize_layers

logger = logging.getLogger(__name__)
CONFIG = Path("configs") / "emoji_intlora_protocol.toml"  # from the repository root, as `make bench` runs
# subjects the zoo models never saw: the unicorn (held out of pretraining) and three OpenMoji ZWJ sequences (no
# sequence is among the pretraining captions): polar bear, rainbow flag, phoenix
SUBJECTS = ["unicorn face", "1F43B-200D-2744-FE0F", "1F3F3-FE0F-200D-1F308", "1F426-200D-1F525"]
PROMPT = "a sks emoji"
QLORA_MERGES = {  # label -> (search, per_channel) of the re-quantization; None: float merge + EDA-DM
    "QLoRA + per-tensor min-max": ("minmax", False),
    "QLoRA + per-channel L2.4": ("l2.4", True),
    "QLoRA, float merge + EDA-DM": None,
}
GRID_COLUMNS = 8
DIAGNOSTICS = ("zero_share", "aux_ratio", "u_clipped")  # IntLoraLayer.diagnostics


@dataclass
class Protocol:
    """The fine-tuning table's settings. Every run shares `model` .. `iters` (stored with each cell: a cell made
    with others is run again); `lrs`, `subjects`, `seeds` and `bits` choose which runs the table holds (fewer than
    the full protocol: a stated subset, in the caption), `workers` how many run at once (one thread each)."""

    model: str = "zoo:emoji"
    steps: int = 500
    n: int = 100  # OpenMoji captions for retention (recognition, FID)
    n_subject: int = 16  # samples of PROMPT per model
    sample_steps: int = 20
    guidance: float = 4.0
    calib_samples: int = 32  # the EDA-DM baseline's calibration trajectories
    iters: int = 50  # and its iterations per block
    lrs: str = "2e-4 1e-3 6e-5"  # space-separated
    subjects: int = 4  # the first of SUBJECTS
    seeds: int = 3
    bits: str = "W4A8 W8A8"
    workers: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.subjects <= len(SUBJECTS) or self.seeds < 1 or self.workers < 1:
            raise QuantuneError(f"subjects 1..{len(SUBJECTS)}, seeds >= 1 and workers >= 1 (got {self})")
        if self.calib_samples < self.sample_steps:  # TDAC: at least one calibration sample per step
            raise QuantuneError(f"calib_samples = {self.calib_samples} < sample_steps = {self.sample_steps}: raise it")
        try:
            lrs = self.lr_list()
        except ValueError:
            raise QuantuneError(f"lrs = {self.lrs!r}: give space-separated learning rates, e.g. '2e-4 1e-3'") from None
        unknown = [b for b in self.bits_list() if b not in BITS]
        if unknown or not lrs or any(lr <= 0 for lr in lrs):
            raise QuantuneError(f"bits = {self.bits!r} (known: {', '.join(BITS)}), lrs = {self.lrs!r}: fix them")

    def lr_list(self) -> list[float]:
        return [float(v) for v in self.lrs.split()]

    def bits_list(self) -> list[str]:
        return self.bits.split()

    def shared(self) -> dict:
        """The settings every run shares (handed to each run's process)."""
        names = ("model", "steps", "n", "n_subject", "sample_steps", "guidance", "calib_samples", "iters")
        return {k: v for k, v in asdict(self).items() if k in names}

    def cell_settings(self) -> dict:
        """What a cell depends on: the shared settings, the subjects, the prompt and the recipe file's text."""
        recipe = hashlib.sha256(CONFIG.read_bytes()).hexdigest()[:16] if CONFIG.exists() else "missing"
        return self.shared() | {"subjects": SUBJECTS, "prompt": PROMPT, "recipe": recipe}

    def sampling(self) -> Settings:
        return Settings(self.n, self.sample_steps, self.calib_samples, self.iters, self.guidance, self.model)


def training_sets(p: Protocol, method: str, bits: str, zero_fix: str, lr: float, seed: int, work: Path) -> list:
    """The recipe's overrides for one run (quantized methods: every other denoiser layer quantized too, A8)."""
    sets = [f"output_dir={work / 'run'}", f"method={method}", f"model.pretrained='{p.model}'", f"optim.lr={lr}",
            f"train.steps={p.steps}", f"train.seed={seed}", f"data.path={work / 'instance'}",
            f"data.class_dir={work.parent / 'class_images'}", f"log.checkpoint_every={max(p.steps // 10, 1)}",
            "log.keep_checkpoints=10"]  # fmt: skip
    if method != "lora":
        sets += [f"quant.bits={BITS[bits][0]}", f"quant.act_bits={BITS[bits][1]}", "quant.quantize_rest=true",
                 f"quant.zero_fix='{zero_fix}'"]  # fmt: skip
    return sets


def run_one(
    p: Protocol, method: str, bits: str, zero_fix: str, lr: float, subject: int, seed: int, work: Path,
    extra: tuple[str, ...] = (),
):  # fmt: skip
    """Train, then score every model the run yields: {label: figures}, the training time and IntLoRA's per-layer
    diagnostics. The first grid columns of each model's subject samples are saved under work/grid/<label>/.
    `extra`: more config overrides after the recipe's (an experiment beside the table, e.g. benchmarks/)."""
    from quantune.demo import instance_images
    from quantune.train.config import config_from_dict, resolve_config
    from quantune.train.trainer import train

    if not CONFIG.exists():
        raise QuantuneError(f"{CONFIG} is missing: run the benchmark from the root of a quantune checkout")
    instance = instance_images(work / "instance", SUBJECTS[subject])
    start = time.time()
    train(resolve_config(str(CONFIG), [*training_sets(p, method, bits, zero_fix, lr, seed, work), *extra]))
    out = {"train_s": time.time() - start, "models": {}}
    ctx = Context(p, work, [rgb(f) for f in instance], *prompts_and_reference(p.n))
    cfg = config_from_dict(json.loads((work / "run" / "config.json").read_text()))
    best = best_of_checkpoints(ctx, cfg)
    for label, (pipe, weights, diag) in final_models(ctx, cfg, bits).items():
        denoiser = family_of(pipe).denoiser_of(pipe)
        row = {**ctx.evaluate(pipe, label), "merge_error": merge_error(weights, denoiser) if weights else float("nan")}
        if method == "lora":  # its final state is scored by the final row only (diffusers' loader, float)
            final = {"subject_similarity": row["subject_similarity"], "step": p.steps}
            best[label] = max([b for b in (best.get(label), final) if b], key=lambda b: b["subject_similarity"])
        out["models"][label] = row | {"best": best.get(label)}
        if diag:
            out["layers"] = diag
    return out


@dataclass
class Context:
    """What every model of one run is scored against."""

    p: Protocol
    work: Path
    instance: list
    prompts: list[str]
    reference: list

    def subject(self, pipe) -> tuple[float, list]:
        from quantune.eval import subject_similarity

        images = samples(pipe, [PROMPT] * self.p.n_subject, self.p.sampling())
        return subject_similarity(images, self.instance), images

    def evaluate(self, pipe, label: str, subject: bool = True) -> dict:
        """Subject similarity (`subject`: against this run's instance images) and retention; the first grid
        columns of the subject samples into work/grid/<label>/."""
        from quantune.eval import fid, glyph_recognition, subject_similarity

        images = samples(pipe, [PROMPT] * self.p.n_subject, self.p.sampling())
        folder = self.work / "grid" / label
        folder.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images[:GRID_COLUMNS]):
            im.save(folder / f"{i}.png")
        retained = samples(pipe, self.prompts, self.p.sampling())
        out = {"fid_vs_openmoji": fid(retained, self.reference), **glyph_recognition(retained, self.prompts)}
        return out | ({"subject_similarity": subject_similarity(images, self.instance)} if subject else {})


def rgb(path: Path):
    from PIL import Image

    return Image.open(path).convert("RGB")


def label_of(method: str, zero_fix: str) -> str:
    name = {"lora": "LoRA, float base", "intlora-mul": "IntLoRA-MUL", "intlora-shift": "IntLoRA-SHIFT"}[method]
    return name + (", mid-rise" if zero_fix == "midrise" else "")


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label)


def final_models(ctx: Context, cfg, bits: str) -> dict:
    """label -> (reloaded pipeline to score, its training weights for the merge error, per-layer diagnostics)."""
    from quantune.models import load_pipeline
    from quantune.train.merge_run import load_run

    run_dir = ctx.work / "run"
    if cfg.method == "lora":
        pipe = load_pipeline(ctx.p.model)
        pipe.load_lora_weights(str(run_dir / "pytorch_lora_weights.safetensors"))  # diffusers' own loader
        return {label_of(cfg.method, "none"): (pipe, None, None)}
    _, pipe, trained = load_run(run_dir, "qlora" if cfg.method == "qlora" else "intlora")
    family = family_of(pipe)
    denoiser = family.denoiser_of(pipe)
    weights = training_weights(denoiser)
    if cfg.method != "qlora":
        diag = {name: layer.diagnostics() for name, layer in intlora_layers(denoiser).items()}
        trained.merge(pipe, cfg)
        label = label_of(cfg.method, cfg.quant.zero_fix)
        return {label: (_reload(pipe, ctx.work / slug(label)), weights, diag)}
    out = {}
    for label, how in QLORA_MERGES.items():
        if how is None:
            merged = _float_merge_eda_dm(ctx, cfg, bits)
        else:
            setattr(pipe, family.denoiser, copy.deepcopy(denoiser))
            requantize_layers(family.denoiser_of(pipe), *how)
            merged = pipe
        out[label] = (_reload(merged, ctx.work / slug(label)), weights, None)
    return out


def _float_merge_eda_dm(ctx: Context, cfg, bits: str):
    """The trained LoRA (its diffusers file) added into the float model's weights, then EDA-DM at `bits`."""
    from quantune.formats import read_lora
    from quantune.lora import merge_into
    from quantune.models import load_pipeline
    from quantune.ptq import PTQConfig, quantize_pipeline

    pipe = load_pipeline(ctx.p.model, backend="torch")
    merge_into(pipe, [(read_lora(ctx.work / "run" / "pytorch_lora_weights.safetensors", pipe)[0], 1.0)])
    p = ctx.p
    ptq = PTQConfig(method="eda-dm", wbits=BITS[bits][0], abits=BITS[bits][1], calib_samples=p.calib_samples,
                    steps=p.sample_steps, iters=p.iters, guidance_scale=p.guidance, seed=cfg.train.seed)  # fmt: skip
    quantize_pipeline(pipe, ptq, progress=False)
    return pipe


def _reload(pipe, folder: Path):
    """Save the integer model and load it back (torch backend: the integer layers stay modules of their names)."""
    from quantune.models import load_pipeline
    from quantune.models.integer import save_integer_pipeline

    return load_pipeline(str(save_integer_pipeline(pipe, folder)), backend="torch")


@torch.no_grad()
def training_weights(denoiser) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (W_train, W_base) [C_out, cols] of every adapted layer: QLoRA's dequantized base + the LoRA delta,
    IntLoRA's W' (at the trained B and at B = 0)."""
    from quantune.lora.inject import lora_layers

    out = {}
    for name, layer in lora_layers(denoiser).items():
        base = layer.base_layer.dequantize()
        out[name] = ((base + layer.weight_update() * layer.multiplier).flatten(1), base.flatten(1))
    for name, layer in intlora_layers(denoiser).items():
        b = layer.lora_B.detach().clone()
        w_train = layer.adapted_weight()
        layer.lora_B.zero_()
        out[name] = (w_train, layer.adapted_weight())
        layer.lora_B.copy_(b)
    return out


@torch.no_grad()
def merge_error(weights: dict, merged) -> float:
    """|W_merged - W_train| / |W_train - W_base| over the layers of `weights`, W_merged from `merged`'s
    integer layers of the same names (0: the merge keeps the trained update exactly)."""
    err = upd = 0.0
    for name, (w_train, w_base) in weights.items():
        w_merged = merged.get_submodule(name).dequantize().reshape(w_train.shape)
        err += float((w_merged - w_train).pow(2).sum())
        upd += float((w_train - w_base).pow(2).sum())
    return (err / upd) ** 0.5 if upd else float("nan")


def best_of_checkpoints(ctx: Context, cfg) -> dict[str, dict]:
    """label -> {"subject_similarity", "step"}: the best of the run's checkpoints (and, trained on an integer
    base, its final state) by subject similarity, each model scored in memory on the torch backend (QLoRA: both
    re-quantizations; not the EDA-DM baseline)."""
    from quantune.io import load_safetensors
    from quantune.train.checkpoint import list_checkpoints
    from quantune.train.merge_run import prepare_run
    from quantune.train.quant_methods import STATE_FILE

    run_dir = ctx.work / "run"
    states = {
        int(c.name.split("-")[1]): c / "trainable.safetensors" for c in list_checkpoints(run_dir / "checkpoints")
    }
    if cfg.method != "lora":  # a float LoRA's final state is its diffusers file: scored by the final model's row
        states[cfg.train.steps] = run_dir / STATE_FILE
    if not states:
        return {}
    pipe, trained = prepare_run(cfg, states[min(states)])
    best: dict[str, dict] = {}
    for step, path in sorted(states.items()):
        trained.load_trainable_state(pipe, load_safetensors(path)[0])
        for label, score in _scores_in_memory(ctx, pipe, cfg).items():
            if label not in best or score > best[label]["subject_similarity"]:
                best[label] = {"subject_similarity": score, "step": step}
    return best


def _scores_in_memory(ctx: Context, pipe, cfg) -> dict[str, float]:
    """Subject similarity of the pipeline as it is (LoRA; IntLoRA, whose training weight is its merge) or of
    each QLoRA re-quantization of a copy of its denoiser."""
    if cfg.method != "qlora":
        return {label_of(cfg.method, cfg.quant.zero_fix): ctx.subject(pipe)[0]}
    family = family_of(pipe)
    trained = family.denoiser_of(pipe)
    out = {}
    for label, how in QLORA_MERGES.items():
        if how is None:
            continue
        merged = copy.deepcopy(trained)
        requantize_layers(merged, *how)
        setattr(pipe, family.denoiser, merged)
        out[label] = ctx.subject(pipe)[0]
    setattr(pipe, family.denoiser, trained)
    return out
