"""The training loop: one readable function on top of accelerate, with the method as a plug-in.

Per optimizer step s (of cfg.train.steps), for each of grad_accum micro-batches: take the next global batch of the
seeded data stream (train/data.py; rank k of W takes its slice), encode to latents (cached or not), compute the
denoising loss (train/objective.py; + prior-preservation loss for DreamBooth), backward (no DDP sync until the
last micro-batch); then clip, optimizer step, LR-scheduler step, EMA update. Every random draw of step s comes
from generators seeded with (seed, s, rank), so a run resumed from a checkpoint at step k continues exactly as the
uninterrupted run. Only the main process writes files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, cast_training_params
from PIL import Image
from tqdm.auto import tqdm

from quantune.errors import QuantuneError
from quantune.families import family_of
from quantune.io import write_json
from quantune.lora.weights import components_of
from quantune.models import load_pipeline
from quantune.quant.intlora import IntLoraLayer
from quantune.quant.layers import ActQuantizer, _QuantWeight
from quantune.train.checkpoint import TrainState, find_checkpoint, load_checkpoint, save_checkpoint
from quantune.train.config import TrainConfig
from quantune.train.data import Batcher, build_datasets, stream_indices
from quantune.train.objective import denoising_loss, latent_params, sample_latents, training_scheduler
from quantune.train.optimizer import make_optimizer
from quantune.train.registry import METHODS
from quantune.train.run_dir import claimed_run_dir
from quantune.train.text_cache import TextCache
from quantune.train.validation import save_validation_grid

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    seconds: float
    final_loss: float
    peak_memory_mb: float
    outputs: list[Path] = field(default_factory=list)
    num_processes: int = 1
    digest: str = ""


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the trainable tensors (name-sorted): equal on every rank when DDP kept them in sync."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 1009 + rank * 7) % (2**63)


def _cast_frozen(pipe, mixed: str) -> None:
    """Mixed precision (GPU): frozen weights in fp16/bf16 to halve their memory, trainable ones kept in fp32. A VAE
    whose config says `force_upcast` (SDXL's overflows in fp16) stays fp32 under fp16."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed)
    if dtype is None:
        return
    for model in components_of(pipe).values():
        trainable = [p for p in model.parameters() if p.requires_grad]
        if len(trainable) < sum(1 for _ in model.parameters()):  # frozen (or a frozen base under a LoRA)
            _cast_float_modules(model, dtype)
            cast_training_params(model, torch.float32)
    if not (dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False)):
        pipe.vae.to(dtype)


def _cast_float_modules(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """model.to(dtype), except integer layers and IntLoRA layers: their scales stay fp32 (they define the weights)."""
    keep = (_QuantWeight, IntLoraLayer, ActQuantizer)
    inside = {id(m) for k in model.modules() if isinstance(k, keep) for m in k.modules()}
    for module in model.modules():
        if id(module) not in inside:
            module._apply(lambda t: t.to(dtype) if t.is_floating_point() else t, recurse=False)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@dataclass
class _Run:
    """Everything a training run holds between steps, built once by `_start` (explicit state, no set-up in the
    loop): the pipeline, the method, the data, the optimiser and the prepared (DDP) models."""

    cfg: TrainConfig
    accelerator: object
    pipe: object
    method: object
    train_set: object
    class_set: object
    params: list
    optimizer: object
    lr_scheduler: object
    ema: object
    denoiser: torch.nn.Module  # the prepared denoiser (a DDP wrapper with several processes)
    text_encoders: dict  # the prepared text encoders that train, by component name
    noise_scheduler: object
    batcher: Batcher
    class_batcher: Batcher | None
    text_cache: TextCache | None = None  # data.cache_text_embeddings
    ts: TrainState = field(default_factory=lambda: TrainState(step=0, position=0))
    last_checkpoint: Path | None = None

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def train(cfg: TrainConfig, resume: str | None = None, overwrite: bool = False) -> TrainResult:
    """Train as `cfg` says into `cfg.output_dir` (see train/run_dir.py for what an existing folder needs:
    `resume` = "latest" or a checkpoint name continues it, `overwrite` replaces a previous run)."""
    main = (os.environ.get("RANK") or "0") == "0"  # before the Accelerator exists (accelerate launch sets RANK)
    if cfg.task == "autoencoder":
        from quantune.train import autoencoder  # deferred: only the VAE task needs it

        if resume:
            raise QuantuneError("task = autoencoder writes no checkpoints, so it cannot --resume: start a new run")
        with claimed_run_dir(cfg.output_dir, resume, overwrite, main):
            started = autoencoder.start_autoencoder(cfg)
        return autoencoder.train_autoencoder(cfg, started)
    with claimed_run_dir(cfg.output_dir, resume, overwrite, main):
        run = _start(cfg, resume)
    bar = tqdm(total=cfg.train.steps, initial=run.ts.step, disable=not run.main, desc="train", dynamic_ncols=True)
    start, loss_value = time.time(), float("nan")
    run.denoiser.train()
    try:
        while run.ts.step < cfg.train.steps:
            loss_value = _train_step(run)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{run.lr_scheduler.get_last_lr()[0]:.2e}")
            _after_step(run, loss_value)
    finally:
        bar.close()  # before any error is printed, so the error line is the last one
    return _finish(run, time.time() - start, loss_value)


def _accelerator(cfg: TrainConfig):
    mixed = cfg.train.mixed_precision if torch.cuda.is_available() else "no"
    if mixed != cfg.train.mixed_precision:
        logger.warning(
            "train.mixed_precision = %s needs a GPU: training in fp32 on the CPU", cfg.train.mixed_precision
        )
    # a trained text encoder may have layers the conditioning never reads (SDXL: the last CLIP layer of the first
    # encoder, whose penultimate states it uses): DDP must then look for parameters without gradients
    unused = cfg.lora.text_encoder or cfg.train.train_text_encoder
    # buffers are frozen and equal on every rank (activation quantizers calibrate on the same batch): broadcasting
    # them each forward would only rebuild the integer layers' kernels (quant/train_kernels.py)
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # on CPU, several processes (WORLD_SIZE > 1) run gloo (MULTI_CPU)
        mixed_precision=mixed,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused, broadcast_buffers=False)],
        log_with="tensorboard" if cfg.log.tensorboard else None,
        project_dir=str(Path(cfg.output_dir) / "logs"),
    )


def _start(cfg: TrainConfig, resume: str | None) -> _Run:
    """Load, prepare and (on a fresh run) calibrate; restore the checkpoint on --resume."""
    accelerator = _accelerator(cfg)
    out = Path(cfg.output_dir)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    pipe = load_pipeline(cfg.model.pretrained, backend="torch")
    pipe.set_progress_bar_config(disable=True)
    family = family_of(pipe)
    with accelerator.main_process_first():
        train_set, class_set = build_datasets(cfg, out, pipe)
    method = METHODS[cfg.method]()
    groups = method.prepare(pipe, cfg)
    params = [p for g in groups for p in g["params"]]
    training_encoders = {
        name: m for name, m in family.text_encoders_of(pipe).items() if any(p.requires_grad for p in m.parameters())
    }
    if cfg.train.gradient_checkpointing:
        family.denoiser_of(pipe).enable_gradient_checkpointing()
        for model in training_encoders.values():
            model.gradient_checkpointing_enable()
    _cast_frozen(pipe, accelerator.mixed_precision)
    pipe.to(accelerator.device)
    noise_scheduler = training_scheduler(pipe)
    if not resume:  # e.g. activation quantizers: once, on the first batches (the same ones on every rank)
        method.calibrate(pipe, lambda: _calibration_forwards(pipe, cfg, train_set, noise_scheduler, accelerator))
    optimizer = make_optimizer(groups, cfg)
    lr_scheduler = get_scheduler(
        cfg.optim.scheduler, optimizer, num_warmup_steps=cfg.optim.warmup_steps, num_training_steps=cfg.train.steps
    )
    ema = EMAModel(params, decay=cfg.train.ema_decay) if cfg.train.ema else None
    denoiser = accelerator.prepare(family.denoiser_of(pipe))
    text_encoders = {name: accelerator.prepare(m) for name, m in training_encoders.items()}
    optimizer = accelerator.prepare(optimizer)
    run = _Run(cfg, accelerator, pipe, method, train_set, class_set, params, optimizer, lr_scheduler, ema,
               denoiser, text_encoders, noise_scheduler, Batcher(train_set, cfg.data.resolution, cfg.data.random_flip),
               Batcher(class_set, cfg.data.resolution) if class_set is not None else None)  # fmt: skip
    if cfg.data.cache_text_embeddings:
        run.text_cache = TextCache.for_run(pipe, cfg, train_set, class_set)
    if resume:
        folder = find_checkpoint(out / "checkpoints", resume)
        run.ts, trainable = load_checkpoint(folder, optimizer, lr_scheduler, ema)
        method.load_trainable_state(pipe, trainable)
        run.last_checkpoint = folder
        logger.info("resumed from %s at step %d", folder, run.ts.step)
    method.ready(pipe)  # calibrated or restored: e.g. the integer layers' kernels
    if accelerator.is_main_process:  # last, so a failed (or failed resumed) start has not touched it
        out.mkdir(parents=True, exist_ok=True)
        write_json(cfg.to_dict(), out / "config.json")
    if cfg.log.tensorboard:
        accelerator.init_trackers("quantune", config=_flat_hparams(cfg))
    return run


def _train_step(run: _Run) -> float:
    """One optimiser step over grad_accum micro-batches; returns the loss averaged over processes."""
    cfg, accelerator = run.cfg, run.accelerator
    world, rank = accelerator.num_processes, accelerator.process_index
    seed = _step_seed(cfg.train.seed, run.ts.step, rank)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout and any other global draws of this step
    accum = cfg.train.grad_accum
    total = 0.0
    for micro in range(accum):
        sync = accelerator.no_sync(run.denoiser) if (micro < accum - 1 and world > 1) else contextlib.nullcontext()
        latents, captions = _next_batch(run, generator)  # the VAE encodes outside autocast, as before
        with sync, accelerator.autocast():
            loss = _micro_batch_loss(run, latents, captions, generator)
            accelerator.backward(loss / accum)
        total += loss.detach().float() / accum
    every = accelerator.gather(total.reshape(1))
    if not torch.isfinite(every).all():
        raise QuantuneError(
            f"the loss became {float(every.max())} at step {run.ts.step + 1}: stopped; the last good checkpoint is "
            f"{run.last_checkpoint or 'none (set log.checkpoint_every)'}; lower optim.lr or train in fp32"
        )
    if cfg.optim.max_grad_norm > 0:
        accelerator.clip_grad_norm_(run.params, cfg.optim.max_grad_norm)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.step(run.params)
    run.ts.step += 1
    return float(every.mean())


def _next_batch(run: _Run, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """The next slice of the seeded data stream (+ the class images' stream for DreamBooth): latents, captions."""
    cfg = run.cfg
    world, rank, per_rank = run.accelerator.num_processes, run.accelerator.process_index, cfg.train.batch_size
    batcher, class_batcher = run.batcher, run.class_batcher
    pos = run.ts.position
    run.ts.position += per_rank * world
    idx = stream_indices(len(run.train_set), cfg.train.seed, pos, per_rank * world)[rank * per_rank :][:per_rank]
    latents = _latents(run.pipe, batcher, idx, generator, cfg.data.cache_latents)
    captions = batcher.captions(idx)
    if cfg.data.caption_dropout:  # the unconditional branch classifier-free guidance samples with
        drop = torch.rand(len(captions), generator=generator) < cfg.data.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    if run.class_set is not None:  # DreamBooth prior preservation: its own stream, same positions
        cidx = stream_indices(len(run.class_set), cfg.train.seed + 1, pos, per_rank * world)
        cidx = cidx[rank * per_rank :][:per_rank]
        latents = torch.cat([latents, _latents(run.pipe, class_batcher, cidx, generator, cfg.data.cache_latents)])
        captions = captions + class_batcher.captions(cidx)
    return latents, captions


def _micro_batch_loss(run: _Run, latents: torch.Tensor, captions: list[str], generator) -> torch.Tensor:
    """The denoising loss of one micro-batch (+ the prior-preservation term for DreamBooth)."""
    cfg, per_rank = run.cfg, run.cfg.train.batch_size
    device = run.accelerator.device
    conditioner = (lambda caps: run.text_cache.condition(caps, device)) if run.text_cache is not None else None
    losses = denoising_loss(run.pipe, latents, captions, generator, run.denoiser, run.text_encoders, cfg.train,
                            run.noise_scheduler, conditioner)  # fmt: skip
    if run.class_set is not None:
        return losses[:per_rank].mean() + cfg.data.prior_loss_weight * losses[per_rank:].mean()
    return losses.mean()


def _after_step(run: _Run, loss_value: float) -> None:
    """Log, checkpoint and validate on their schedules (files only from the main process)."""
    cfg, ts = run.cfg, run.ts
    if ts.step % cfg.log.every == 0 or ts.step == cfg.train.steps:
        run.accelerator.log({"loss": loss_value, "lr": run.lr_scheduler.get_last_lr()[0]}, step=ts.step)
    if run.main and cfg.log.checkpoint_every and ts.step % cfg.log.checkpoint_every == 0 and ts.step < cfg.train.steps:
        state = run.method.trainable_state(run.pipe)
        run.last_checkpoint = save_checkpoint(run.out / "checkpoints", ts, state, run.optimizer, run.lr_scheduler,
                                              run.ema, keep=cfg.log.keep_checkpoints)  # fmt: skip
    if run.main and cfg.log.validation_every and ts.step % cfg.log.validation_every == 0 and ts.step < cfg.train.steps:
        _validate(run, ts.step)
    run.accelerator.wait_for_everyone()


def _finish(run: _Run, seconds: float, loss_value: float) -> TrainResult:
    """EMA weights in, the method's exports and the final grid written, result.json."""
    accelerator = run.accelerator
    world, rank = accelerator.num_processes, accelerator.process_index
    digest = state_digest(run.method.trainable_state(run.pipe))
    logger.info("rank %d/%d: trainable state sha256 %s", rank, world, digest)
    outputs: list[Path] = []
    if run.main:
        if run.ema is not None:
            run.ema.copy_to(run.params)
        outputs = run.method.export(run.pipe, run.out, run.cfg)
        outputs.append(_validate(run, run.ts.step, final=True))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    peak = _peak_memory_mb(accelerator.device)
    result = TrainResult(run.out, run.ts.step, seconds, loss_value, peak, outputs, world, digest)
    if run.main:
        write_json(
            {k: str(v) if isinstance(v, Path) else v for k, v in vars(result).items() if k != "outputs"}
            | {"outputs": [str(p) for p in outputs]},
            run.out / "result.json",
        )
    return result


def _calibration_forwards(pipe, cfg: TrainConfig, train_set, noise_scheduler, accelerator) -> None:
    """Denoiser forwards on the first `quant.calib_batches` batches of the data stream (rank 0's slice), each with
    its step's seed (its own noise and timestep), for calibration; 1: the first batch only, as IntLoRA's reference."""
    batcher, b = Batcher(train_set, cfg.data.resolution), cfg.train.batch_size
    stream = stream_indices(len(train_set), cfg.train.seed, 0, b * cfg.quant.calib_batches)
    for j in range(cfg.quant.calib_batches):
        generator = torch.Generator().manual_seed(_step_seed(cfg.train.seed, j, 0))
        idx = stream[j * b : (j + 1) * b]
        latents = _latents(pipe, batcher, idx, generator, cache=False)
        with accelerator.autocast():
            denoising_loss(pipe, latents, batcher.captions(idx), generator, options=cfg.train,
                           scheduler=noise_scheduler)  # fmt: skip


def _latents(pipe, batcher: Batcher, idx: list[int], generator: torch.Generator, cache: bool) -> torch.Tensor:
    if cache:
        missing = [i for i in idx if i not in batcher.latent_cache]
        if missing:
            params = latent_params(pipe, batcher.pixels(missing, generator))
            batcher.latent_cache.update({i: p.cpu() for i, p in zip(missing, params)})
        params = torch.stack([batcher.latent_cache[i] for i in idx]).to(pipe.device)
    else:
        params = latent_params(pipe, batcher.pixels(idx, generator))
    return sample_latents(pipe, params, generator)


def _validate(run: _Run, step: int, final: bool = False) -> Path:
    cfg = run.cfg
    run.denoiser.eval()
    path = save_validation_grid(
        run.pipe, cfg, run.out / ("samples.png" if final else f"validation/step-{step:06d}.png")
    )
    run.denoiser.train()
    if cfg.log.tensorboard:
        image = np.asarray(Image.open(path).convert("RGB"))[None]  # [1, H, W, 3]
        for tracker in run.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"validation": image}, step=step, dataformats="NHWC")
    return path


def _flat_hparams(cfg: TrainConfig) -> dict:
    flat = {}
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            for k, v in values.items():
                flat[f"{section}.{k}"] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
        else:
            flat[section] = values
    return flat
