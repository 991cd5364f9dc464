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
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from quantune.errors import QuantuneError
from quantune.io import write_json
from quantune.train.checkpoint import TrainState, find_checkpoint, load_checkpoint, save_checkpoint
from quantune.train.config import TrainConfig
from quantune.train.data import Batcher, build_datasets, stream_indices
from quantune.train.objective import denoising_loss, latent_params, sample_latents
from quantune.train.registry import METHODS
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


def make_optimizer(groups: list[dict], cfg) -> torch.optim.Optimizer:
    o = cfg.optim
    kwargs = dict(betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if o.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise QuantuneError(
                "optim.use_8bit_adam needs bitsandbytes: pip install bitsandbytes (CUDA only)"
            ) from None
        if not torch.cuda.is_available():
            raise QuantuneError("optim.use_8bit_adam needs CUDA: set it to false on CPU")
        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def _cast_frozen(pipe, mixed: str) -> None:
    """Mixed precision (GPU): frozen weights in fp16/bf16 to halve their memory, trainable ones kept in fp32."""
    from diffusers.training_utils import cast_training_params

    from quantune.lora.weights import components_of

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed)
    if dtype is None:
        return
    for model in components_of(pipe).values():
        trainable = [p for p in model.parameters() if p.requires_grad]
        if len(trainable) < sum(1 for _ in model.parameters()):  # frozen (or a frozen base under a LoRA)
            _cast_float_modules(model, dtype)
            cast_training_params(model, torch.float32)
    pipe.vae.to(dtype)


def _cast_float_modules(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """model.to(dtype), except integer layers and IntLoRA layers: their scales stay fp32 (they define the weights)."""
    from quantune.quant.intlora import IntLoraLayer
    from quantune.quant.layers import ActQuantizer, _QuantWeight

    keep = (_QuantWeight, IntLoraLayer, ActQuantizer)
    inside = {id(m) for k in model.modules() if isinstance(k, keep) for m in k.modules()}
    for module in model.modules():
        if id(module) not in inside:
            module._apply(lambda t: t.to(dtype) if t.is_floating_point() else t, recurse=False)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def train(cfg: TrainConfig, resume: str | None = None) -> TrainResult:
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from quantune.models import load_pipeline

    if cfg.task == "autoencoder":
        from quantune.train.autoencoder import train_autoencoder

        return train_autoencoder(cfg)
    out = Path(cfg.output_dir)
    mixed = cfg.train.mixed_precision if torch.cuda.is_available() else "no"
    if mixed != cfg.train.mixed_precision:
        logger.warning(
            "train.mixed_precision = %s needs a GPU: training in fp32 on the CPU", cfg.train.mixed_precision
        )
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # on CPU, several processes (WORLD_SIZE > 1) run gloo (MULTI_CPU)
        mixed_precision=mixed,
        log_with="tensorboard" if cfg.log.tensorboard else None,
        project_dir=str(out / "logs"),
    )
    main = accelerator.is_main_process
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(cfg.to_dict(), out / "config.json")

    pipe = load_pipeline(cfg.model.pretrained)
    pipe.set_progress_bar_config(disable=True)
    with accelerator.main_process_first():
        train_set, class_set = build_datasets(cfg, out, pipe)
    method = METHODS[cfg.method]()
    groups = method.prepare(pipe, cfg)
    params = [p for g in groups for p in g["params"]]
    if cfg.train.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        if any(p.requires_grad for p in pipe.text_encoder.parameters()):
            pipe.text_encoder.gradient_checkpointing_enable()
    _cast_frozen(pipe, mixed)
    pipe.to(accelerator.device)
    per_rank = cfg.train.batch_size
    if not resume:  # e.g. activation quantizers: once, on the first batch (the same one on every rank)
        method.calibrate(pipe, lambda: _first_batch_forward(pipe, cfg, train_set, per_rank, accelerator))
    optimizer = make_optimizer(groups, cfg)
    lr_scheduler = get_scheduler(
        cfg.optim.scheduler, optimizer, num_warmup_steps=cfg.optim.warmup_steps, num_training_steps=cfg.train.steps
    )
    ema = EMAModel(params, decay=cfg.train.ema_decay) if cfg.train.ema else None
    train_te = any(p.requires_grad for p in pipe.text_encoder.parameters())
    unet = accelerator.prepare(pipe.unet)
    text_encoder = accelerator.prepare(pipe.text_encoder) if train_te else pipe.text_encoder
    optimizer = accelerator.prepare(optimizer)

    ts = TrainState(step=0, position=0)
    last_checkpoint = None
    if resume:
        folder = find_checkpoint(out / "checkpoints", resume)
        ts, trainable = load_checkpoint(folder, optimizer, lr_scheduler, ema)
        method.load_trainable_state(pipe, trainable)
        last_checkpoint = folder
        logger.info("resumed from %s at step %d", folder, ts.step)
    if cfg.log.tensorboard:
        accelerator.init_trackers("quantune", config=_flat_hparams(cfg))

    world, rank = accelerator.num_processes, accelerator.process_index
    per_rank, accum = cfg.train.batch_size, cfg.train.grad_accum
    batcher = Batcher(train_set, cfg.data.resolution, cfg.data.random_flip)
    class_batcher = Batcher(class_set, cfg.data.resolution) if class_set is not None else None
    generator = torch.Generator()
    bar = tqdm(total=cfg.train.steps, initial=ts.step, disable=not main, desc="train", dynamic_ncols=True)
    start, loss_value = time.time(), float("nan")
    unet.train()
    while ts.step < cfg.train.steps:
        seed = _step_seed(cfg.train.seed, ts.step, rank)
        generator.manual_seed(seed)
        torch.manual_seed(seed)  # dropout and any other global draws of this step
        total = 0.0
        for micro in range(accum):
            pos = ts.position
            ts.position += per_rank * world
            idx = stream_indices(len(train_set), cfg.train.seed, pos, per_rank * world)[rank * per_rank :][:per_rank]
            latents = _latents(pipe, batcher, idx, generator, cfg.data.cache_latents)
            captions = batcher.captions(idx)
            if cfg.data.caption_dropout:  # the unconditional branch classifier-free guidance samples with
                drop = torch.rand(len(captions), generator=generator) < cfg.data.caption_dropout
                captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
            if class_batcher is not None:  # DreamBooth prior preservation: its own stream, same positions
                cidx = stream_indices(len(class_set), cfg.train.seed + 1, pos, per_rank * world)
                cidx = cidx[rank * per_rank :][:per_rank]
                latents = torch.cat([latents, _latents(pipe, class_batcher, cidx, generator, cfg.data.cache_latents)])
                captions = captions + class_batcher.captions(cidx)
            sync = accelerator.no_sync(unet) if (micro < accum - 1 and world > 1) else contextlib.nullcontext()
            with sync, accelerator.autocast():
                losses = denoising_loss(
                    pipe,
                    latents,
                    captions,
                    generator,
                    unet,
                    text_encoder,
                    cfg.train.min_snr_gamma,
                    cfg.train.noise_offset,
                )
                if class_batcher is not None:
                    loss = losses[:per_rank].mean() + cfg.data.prior_loss_weight * losses[per_rank:].mean()
                else:
                    loss = losses.mean()
                accelerator.backward(loss / accum)
            total += loss.detach().float() / accum
        every = accelerator.gather(total.reshape(1))
        if not torch.isfinite(every).all():
            raise QuantuneError(
                f"the loss became {float(every.max())} at step {ts.step + 1}: stopped; the last good checkpoint is "
                f"{last_checkpoint or 'none (set log.checkpoint_every)'}; lower optim.lr or train in fp32"
            )
        if cfg.optim.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(params)
        ts.step += 1
        loss_value = float(every.mean())
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
        if ts.step % cfg.log.every == 0 or ts.step == cfg.train.steps:
            accelerator.log({"loss": loss_value, "lr": lr_scheduler.get_last_lr()[0]}, step=ts.step)
        if main and cfg.log.checkpoint_every and ts.step % cfg.log.checkpoint_every == 0 and ts.step < cfg.train.steps:
            last_checkpoint = save_checkpoint(
                out / "checkpoints",
                ts,
                method.trainable_state(pipe),
                optimizer,
                lr_scheduler,
                ema,
                keep=cfg.log.keep_checkpoints,
            )
        if main and cfg.log.validation_every and ts.step % cfg.log.validation_every == 0 and ts.step < cfg.train.steps:
            _validate(pipe, cfg, out, ts.step, accelerator, unet)
        accelerator.wait_for_everyone()
    bar.close()
    seconds = time.time() - start

    digest = state_digest(method.trainable_state(pipe))
    logger.info("rank %d/%d: trainable state sha256 %s", rank, world, digest)
    outputs: list[Path] = []
    if main:
        if ema is not None:
            ema.copy_to(params)
        outputs = method.export(pipe, out, cfg)
        outputs.append(_validate(pipe, cfg, out, ts.step, accelerator, unet, final=True))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    peak = _peak_memory_mb(accelerator.device)
    result = TrainResult(out, ts.step, seconds, loss_value, peak, outputs, world, digest)
    if main:
        write_json(
            {k: str(v) if isinstance(v, Path) else v for k, v in vars(result).items() if k != "outputs"}
            | {"outputs": [str(p) for p in outputs]},
            out / "result.json",
        )
    return result


def _first_batch_forward(pipe, cfg: TrainConfig, train_set, per_rank: int, accelerator) -> None:
    """One UNet forward on the first batch of the data stream (rank 0's slice), for calibration."""
    generator = torch.Generator().manual_seed(_step_seed(cfg.train.seed, 0, 0))
    batcher = Batcher(train_set, cfg.data.resolution)
    idx = stream_indices(len(train_set), cfg.train.seed, 0, per_rank)[:per_rank]
    latents = _latents(pipe, batcher, idx, generator, cache=False)
    with accelerator.autocast():
        denoising_loss(pipe, latents, batcher.captions(idx), generator, pipe.unet, pipe.text_encoder, None, 0.0)


def _latents(pipe, batcher: Batcher, idx: list[int], generator: torch.Generator, cache: bool) -> torch.Tensor:
    if cache:
        missing = [i for i in idx if i not in batcher.latent_cache]
        if missing:
            params = latent_params(pipe, batcher.pixels(missing, generator))
            batcher.latent_cache.update({i: p.cpu() for i, p in zip(missing, params)})
        params = torch.stack([batcher.latent_cache[i] for i in idx]).to(pipe.unet.device)
    else:
        params = latent_params(pipe, batcher.pixels(idx, generator))
    return sample_latents(pipe, params, generator)


def _validate(pipe, cfg: TrainConfig, out: Path, step: int, accelerator, unet, final: bool = False) -> Path:
    unet.eval()
    path = save_validation_grid(pipe, cfg, out / ("samples.png" if final else f"validation/step-{step:06d}.png"))
    unet.train()
    if cfg.log.tensorboard:
        import numpy as np
        from PIL import Image

        image = np.asarray(Image.open(path).convert("RGB"))[None]  # [1, H, W, 3]
        for tracker in accelerator.trackers:
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
