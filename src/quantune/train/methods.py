"""Training methods: what is trainable, how it is checkpointed and how the result is exported.

The trainer's loop never looks inside a method: `prepare` makes the trainable parameters (param groups for the
optimizer), `trainable_state` / `load_trainable_state` give and take exactly those tensors for checkpoints, and
`export` writes the final artefacts. qlora / intlora-mul / intlora-shift live in train/quant_methods.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from quantune.errors import QuantuneError
from quantune.families import family_of
from quantune.formats import write_lora
from quantune.io import DIFFUSERS_FOLDER, atomic_dir
from quantune.lora.inject import add_lora, lora_layers, lora_parameters, remove_lora
from quantune.lora.weights import components_of, get_lora_weights

logger = logging.getLogger(__name__)


class TrainingMethod:
    name = "base"

    def prepare(self, pipe, cfg) -> list[dict]:
        raise NotImplementedError

    def trainable_state(self, pipe) -> dict[str, torch.Tensor]:
        """Every trainable tensor, keyed "<component>.<parameter name>" (what a checkpoint must hold)."""
        return {
            f"{c}.{n}": p.detach()
            for c, model in components_of(pipe).items()
            for n, p in model.named_parameters()
            if p.requires_grad
        }

    def load_trainable_state(self, pipe, state: dict[str, torch.Tensor]) -> None:
        own = self.trainable_state(pipe)
        missing = set(own) - set(state)
        if missing:
            raise QuantuneError(
                f"the checkpoint lacks {len(missing)} trainable tensors (e.g. {min(missing)}): "
                "it was written by another method or config"
            )
        with torch.no_grad():
            for key, value in own.items():
                value.copy_(state[key])

    def calibrate(self, pipe, run) -> None:
        """Calibrate what needs data before training (activation quantizers); `run()` does one forward."""

    def ready(self, pipe) -> None:
        """Called once the model is calibrated or restored from a checkpoint, before the first step."""

    def export(self, pipe, out_dir: Path, cfg) -> list[Path]:
        raise NotImplementedError


def freeze_all(pipe) -> None:
    """Every model of the pipeline frozen (the VAE, every text encoder including T5, the denoiser)."""
    for model in pipe.components.values():
        if isinstance(model, torch.nn.Module):
            model.requires_grad_(False)


def trainable_text_encoders(pipe) -> dict:
    """The text encoders the family lets train (CLIP's), or one error line when it has none (T5 stays frozen)."""
    family = family_of(pipe)
    found = family.lora_text_encoders_of(pipe)
    if not found:
        raise QuantuneError(
            f"{family.name}'s text encoders ({', '.join(family.text_encoders)}) stay frozen: set lora.text_encoder "
            "and train.train_text_encoder to false"
        )
    return found


def text_encoder_lora(pipe, cfg) -> list[dict]:
    """A LoRA on each of the family's trainable text encoders (seeds train.seed + 1, + 2, ...): their param groups."""
    groups = []
    family = family_of(pipe)
    for i, model in enumerate(trainable_text_encoders(pipe).values()):
        if not lora_layers(model):  # else an embedded adapter, trained further
            add_lora(model, cfg.lora.text_encoder_config(family.text_encoder_targets, seed=cfg.train.seed + 1 + i))
        params = [p.requires_grad_(True) for p in lora_parameters(model)]
        groups.append({"params": params, "lr": cfg.optim.text_encoder_lr or cfg.optim.lr})
    return groups


def merge_text_encoder_loras(pipe) -> None:
    """Merge the (float) LoRAs of the text encoders into their weights."""
    for model in family_of(pipe).text_encoders_of(pipe).values():
        if lora_layers(model):
            remove_lora(model, merge=True)


def continue_embedded(model, cfg) -> None:
    """Train a `lora embed` folder's adapter further: at strength 1 (the exported file is what trained), with its
    own type, ranks and targets (a [lora] type or DoRA flag that differs is said once, then not used)."""
    layers = lora_layers(model)
    config = cfg.lora.denoiser_config()  # "dora" read as LoRA + DoRA
    kinds = {(type(layer.adapter_module()).kind, layer.decomposition is not None) for layer in layers.values()}
    if kinds != {(config.type, config.dora)}:
        logger.warning("the model's embedded adapter (%s) is trained further as it is, not as lora.type = %r",
                       ", ".join(f"{k}{' + DoRA' if d else ''}" for k, d in sorted(kinds)), cfg.lora.type)  # fmt: skip
    for layer in layers.values():
        layer.multiplier = 1.0
    logger.info("training the embedded adapter of %d modules further (strength 1)", len(layers))


class LoraMethod(TrainingMethod):
    """Float LoRA on the denoiser (and optionally the text encoders); base frozen."""

    name = "lora"

    def prepare(self, pipe, cfg) -> list[dict]:
        family = family_of(pipe)
        freeze_all(pipe)
        denoiser = family.denoiser_of(pipe)
        if lora_layers(denoiser):  # a `lora embed` folder's adapter: trained further, whatever its type
            continue_embedded(denoiser, cfg)
        else:
            add_lora(denoiser, cfg.lora.denoiser_config(family, seed=cfg.train.seed))
        groups = [{"params": lora_parameters(denoiser), "lr": cfg.optim.lr}]
        for p in groups[0]["params"]:
            p.requires_grad_(True)
        if cfg.lora.text_encoder:
            groups += text_encoder_lora(pipe, cfg)
        return groups

    def export(self, pipe, out_dir: Path, cfg) -> list[Path]:
        weights = get_lora_weights(pipe)
        config = cfg.lora.denoiser_config(family_of(pipe))
        q = write_lora(weights, out_dir / "lora.safetensors", "quantune", config.to_json(), overwrite=True)
        return [q, *interop_export(weights, out_dir, pipe)]


INTEROP = [("pytorch_lora_weights.safetensors", "diffusers"), ("lora_kohya.safetensors", "kohya"), ("peft", "peft")]


def interop_export(weights, out_dir: Path, pipe) -> list[Path]:
    """The adapter in the first format other tools load that can hold it: diffusers' (LoRA, DoRA), else kohya's
    (LoHa / LoKr, which ComfyUI, A1111 and LyCORIS read), else peft's (a LoHa / LoKr on a transformer's fused
    modules); the reasons the others could not are logged."""
    for name, fmt in INTEROP:
        try:
            return [write_lora(weights, out_dir / name, fmt, pipe=pipe, overwrite=True)]
        except QuantuneError as e:
            logger.info("no %s export of this adapter: %s", fmt, e)
    logger.warning("the adapter is written in the quantune format only (no other format holds it)")
    return []


class FullMethod(TrainingMethod):
    """Full fine-tuning of the denoiser (and optionally the text encoders): lora_wrapper's baseline, zoo:emoji's
    recipe."""

    name = "full"

    def prepare(self, pipe, cfg) -> list[dict]:
        family = family_of(pipe)
        freeze_all(pipe)
        denoiser = family.denoiser_of(pipe).requires_grad_(True)
        groups = [{"params": list(denoiser.parameters()), "lr": cfg.optim.lr}]
        if cfg.train.train_text_encoder:
            for model in trainable_text_encoders(pipe).values():
                model.requires_grad_(True)
                groups.append({"params": list(model.parameters()), "lr": cfg.optim.text_encoder_lr or cfg.optim.lr})
        return groups

    def export(self, pipe, out_dir: Path, cfg) -> list[Path]:
        with atomic_dir(out_dir / "pipeline", DIFFUSERS_FOLDER, overwrite=True) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
        return [out_dir / "pipeline"]
