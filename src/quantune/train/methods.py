"""Training methods: what is trainable, how it is checkpointed and how the result is exported.

The trainer's loop never looks inside a method: `prepare` makes the trainable parameters (param groups for the
optimizer), `trainable_state` / `load_trainable_state` give and take exactly those tensors for checkpoints, and
`export` writes the final artefacts. qlora / intlora-mul / intlora-shift live in train/quant_methods.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from quantune.io import atomic_dir
from quantune.lora.inject import add_lora, lora_parameters
from quantune.lora.weights import components_of

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
            from quantune.errors import QuantuneError

            raise QuantuneError(
                f"the checkpoint lacks {len(missing)} trainable tensors (e.g. {min(missing)}): "
                "it was written by another method or config"
            )
        with torch.no_grad():
            for key, value in own.items():
                value.copy_(state[key])

    def calibrate(self, pipe, run) -> None:
        """Calibrate what needs data before training (activation quantizers); `run()` does one forward."""

    def export(self, pipe, out_dir: Path, cfg) -> list[Path]:
        raise NotImplementedError


class LoraMethod(TrainingMethod):
    """Float LoRA on the UNet (and optionally the text encoder); base frozen."""

    name = "lora"

    def prepare(self, pipe, cfg) -> list[dict]:
        components = components_of(pipe)
        for model in components.values():
            model.requires_grad_(False)
        add_lora(pipe.unet, cfg.lora.unet_config(seed=cfg.train.seed))
        groups = [{"params": lora_parameters(pipe.unet), "lr": cfg.optim.lr}]
        if cfg.lora.text_encoder:
            add_lora(pipe.text_encoder, cfg.lora.text_encoder_config(seed=cfg.train.seed + 1))
            groups.append(
                {"params": lora_parameters(pipe.text_encoder), "lr": cfg.optim.text_encoder_lr or cfg.optim.lr}
            )
        return groups

    def export(self, pipe, out_dir: Path, cfg) -> list[Path]:
        from quantune.api import save_lora
        from quantune.formats import write_lora
        from quantune.lora.weights import get_lora_weights

        weights = get_lora_weights(pipe)
        q = save_lora(weights, out_dir / "lora.safetensors", config=cfg.lora.unet_config())
        d = write_lora(weights, out_dir / "pytorch_lora_weights.safetensors", "diffusers")
        return [q, d]


class FullMethod(TrainingMethod):
    """Full fine-tuning of the UNet (and optionally the text encoder): lora_wrapper's baseline, zoo:emoji's recipe."""

    name = "full"

    def prepare(self, pipe, cfg) -> list[dict]:
        for model in components_of(pipe).values():
            model.requires_grad_(False)
        pipe.unet.requires_grad_(True)
        groups = [{"params": [p for p in pipe.unet.parameters()], "lr": cfg.optim.lr}]
        if cfg.train.train_text_encoder:
            pipe.text_encoder.requires_grad_(True)
            te_params = [p for p in pipe.text_encoder.parameters()]
            groups.append({"params": te_params, "lr": cfg.optim.text_encoder_lr or cfg.optim.lr})
        return groups

    def export(self, pipe, out_dir: Path, cfg) -> list[Path]:
        with atomic_dir(out_dir / "pipeline", markers=("model_index.json",)) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
        return [out_dir / "pipeline"]
