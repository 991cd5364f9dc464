"""One training run of the fine-tuning table (quality_finetune.py), in its own process: DreamBooth by the IntLoRA
reference's protocol (configs/emoji_intlora_protocol.toml; docs/intlora.md section 6), then every model it yields.

A run is one method (and bits, zero fix) at one learning rate, subject and seed. What it yields:
- lora: the float LoRA, loaded with diffusers' own `load_lora_weights`;
- qlora: the LoRA trained on the integer base put back into an integer model three ways, the QLoRA + PTQ baselines
  that bracket the IntLoRA paper's unstated one: re-quantized with one min-max scale per tensor; re-quantized per
  output channel with the L2.4 search (quantune's `qlora merge`); merged into the *float* weights, then quantized
  by EDA-DM (W?A8, its own calibration);
- intlora-mul / intlora-shift: the integer product / shift (`intlora merge`: exactly the training weight W').
Every integer model is saved and loaded back as a user would (`load_pipeline`, its default backend). Metrics:
- subject similarity: the mean cosine of `n_subject` samples of "a sks emoji" to the instance images (the
  OpenMoji feature network: the offline stand-in for DINO / CLIP-I), at the final step; and the best over the
  run's 10 checkpoints by that same test metric (the reference's selection: optimistic, reported apart; scored
  in memory, not saved and reloaded; not for the EDA-DM baseline, which would need a PTQ run per checkpoint);
- retention of the base model: glyph recognition top-1 / top-5 and FID vs OpenMoji of `n` OpenMoji captions;
- merge error |W_merged - W_train| / |W_train - W_base| over the adapted layers (W_train: what the training
  forward used; W_base: the same with B = 0), and IntLoRA's per-layer diagnostics (IntLoraLayer.diagnostics).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from quantune.bench.quality_ptq import BITS, Settings, prompts_and_reference, samples
from quantune.errors import QuantuneError
from quantune.families import family_of

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
        names = ("model", "steps", "n", "n_subject", "sample_steps", "guidance", "calib_samples", "iters")
        return {k: v for k, v in asdict(self).items() if k in names}

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


def run_one(p: Protocol, method: str, bits: str, zero_fix: str, lr: float, subject: int, seed: int, work: Path):
    """Train, then score every model the run yields: {label: figures}, the training time and IntLoRA's per-layer
    diagnostics. The first grid columns of each model's subject samples are saved under work/<label>/."""
    from quantune.demo import instance_images
    from quantune.train.config import resolve_config
    from quantune.train.trainer import train

    if not CONFIG.exists():
        raise QuantuneError(f"{CONFIG} is missing: run the benchmark from the root of a quantune checkout")
    instance = instance_images(work / "instance", SUBJECTS[subject])
    start = time.time()
    train(resolve_config(str(CONFIG), training_sets(p, method, bits, zero_fix, lr, seed, work)))
    out = {"train_s": time.time() - start, "models": {}}
    ctx = Context(p, work, [_rgb(f) for f in instance], *prompts_and_reference(p.n))
    best = best_of_checkpoints(ctx, method)
    for label, (pipe, err, diag) in final_models(ctx, method, bits).items():
        row = {**ctx.evaluate(pipe, label), "merge_error": err}
        out["models"][label] = row | {"best": _with_final(best.get(label), row, label, p.steps)}
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

    def evaluate(self, pipe, label: str) -> dict:
        from quantune.eval import fid, glyph_recognition

        similarity, images = self.subject(pipe)
        folder = self.work / "grid" / label
        folder.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images[:GRID_COLUMNS]):
            im.save(folder / f"{i}.png")
        retained = samples(pipe, self.prompts, self.p.sampling())
        return {"subject_similarity": similarity, "fid_vs_openmoji": fid(retained, self.reference),
                **glyph_recognition(retained, self.prompts)}  # fmt: skip


def _with_final(best: dict | None, row: dict, label: str, steps: int) -> dict | None:
    """The best checkpoint, or the final model when it scores higher (a float LoRA's final state is scored by its
    final row only); None for the EDA-DM baseline (no selection over checkpoints)."""
    if label in QLORA_MERGES and QLORA_MERGES[label] is None:
        return None
    final = {"subject_similarity": row["subject_similarity"], "step": steps}
    return final if best is None or final["subject_similarity"] > best["subject_similarity"] else best


def _rgb(path: Path):
    from PIL import Image

    return Image.open(path).convert("RGB")


def label_of(method: str, zero_fix: str) -> str:
    name = {"lora": "LoRA, float base", "intlora-mul": "IntLoRA-MUL", "intlora-shift": "IntLoRA-SHIFT"}[method]
    return name + (", mid-rise" if zero_fix == "midrise" else "")


def final_models(ctx: Context, method: str, bits: str) -> dict:
    """label -> (pipeline to score, merge error, per-layer diagnostics) of the run's final state."""
    from quantune.models import load_pipeline
    from quantune.train.config import config_from_dict

    run_dir = ctx.work / "run"
    cfg = config_from_dict(json.loads((run_dir / "config.json").read_text()))
    if method == "lora":
        pipe = load_pipeline(ctx.p.model)
        pipe.load_lora_weights(str(run_dir / "pytorch_lora_weights.safetensors"))  # diffusers' own loader
        return {label_of(method, "none"): (pipe, float("nan"), None)}
    if method == "qlora":
        return {label: _qlora_model(ctx, cfg, label, bits) for label in QLORA_MERGES}
    from quantune.train.merge_run import load_run

    _, pipe, trained = load_run(run_dir, "intlora")
    denoiser = family_of(pipe).denoiser_of(pipe)
    diag = {name: layer.diagnostics() for name, layer in intlora_layers(denoiser).items()}
    weights = training_weights(denoiser)
    trained.merge(pipe, cfg)
    label = label_of(method, cfg.quant.zero_fix)
    return {label: (_reload(pipe, ctx.work / "merged"), merge_error(weights, denoiser), diag)}


def _qlora_model(ctx: Context, cfg, label: str, bits: str) -> tuple:
    from quantune.train.merge_run import load_run

    _, pipe, _ = load_run(ctx.work / "run", "qlora")
    denoiser = family_of(pipe).denoiser_of(pipe)
    weights = training_weights(denoiser)
    if QLORA_MERGES[label] is None:
        pipe = _float_merge_eda_dm(ctx, cfg, bits)
        denoiser = family_of(pipe).denoiser_of(pipe)
    else:
        requantize_all(denoiser, *QLORA_MERGES[label])
    err = merge_error(weights, denoiser)
    return _reload(pipe, ctx.work / label.replace(" ", "_").replace(",", "")), err, None


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
    """Save the integer model and load it back with its default backend, as a user runs it."""
    from quantune.models import load_pipeline
    from quantune.models.integer import save_integer_pipeline

    return load_pipeline(str(save_integer_pipeline(pipe, folder)))


def intlora_layers(denoiser) -> dict:
    from quantune.train.quant_methods import intlora_layers as layers

    return layers(denoiser)


def requantize_all(denoiser, search: str, per_channel: bool) -> None:
    """QLoRA's merge with a stated re-quantization: every LoRA layer on an integer base, in place."""
    from quantune.lora.inject import lora_layers
    from quantune.modules import set_module
    from quantune.train.quant_methods import requantize

    with torch.no_grad():
        for name, layer in lora_layers(denoiser).items():
            set_module(denoiser, name, requantize(layer, search, per_channel))


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


def best_of_checkpoints(ctx: Context, method: str) -> dict[str, dict]:
    """label -> {"subject_similarity", "step"}: the best of the run's checkpoints and its final state by subject
    similarity, each model scored in memory (QLoRA: both re-quantizations; not the EDA-DM baseline)."""
    from quantune.io import load_safetensors
    from quantune.train.config import config_from_dict
    from quantune.train.merge_run import prepare_run
    from quantune.train.quant_methods import STATE_FILE

    run_dir = ctx.work / "run"
    cfg = config_from_dict(json.loads((run_dir / "config.json").read_text()))
    states = {int(c.name.split("-")[1]): c / "trainable.safetensors" for c in (run_dir / "checkpoints").iterdir()}
    if method != "lora":  # a float LoRA's final state is its diffusers file: scored by the final model's row
        states[cfg.train.steps] = run_dir / STATE_FILE
    pipe, trained = prepare_run(cfg, states[min(states)])
    best: dict[str, dict] = {}
    for step, path in sorted(states.items()):
        trained.load_trainable_state(pipe, load_safetensors(path)[0])
        for label, score in _scores_in_memory(ctx, pipe, method, cfg.quant.zero_fix).items():
            if label not in best or score > best[label]["subject_similarity"]:
                best[label] = {"subject_similarity": score, "step": step}
    return best


def _scores_in_memory(ctx: Context, pipe, method: str, zero_fix: str) -> dict[str, float]:
    """Subject similarity of the pipeline as it is (LoRA; IntLoRA, whose training weight is its merge) or of
    each QLoRA re-quantization of a copy of its denoiser."""
    if method != "qlora":
        return {label_of(method, zero_fix): ctx.subject(pipe)[0]}
    family = family_of(pipe)
    trained = family.denoiser_of(pipe)
    out = {}
    for label, how in QLORA_MERGES.items():
        if how is None:
            continue
        merged = copy.deepcopy(trained)
        requantize_all(merged, *how)
        setattr(pipe, family.denoiser, merged)
        out[label] = ctx.subject(pipe)[0]
    setattr(pipe, family.denoiser, trained)
    return out
