"""The model-family contract: everything a job needs to know about one kind of diffusers pipeline.

A family says which component is the denoiser (`unet` or `transformer`) and which are text encoders, how it is
recognised (pipeline / denoiser class names), how captions become the denoiser's conditioning (through the
pipeline's own `encode_prompt`), which inputs one training forward takes, the default LoRA targets, the PTQ
specifics (the TDAC feature module, the layers kept at 8 bits) and its tiny zoo builders.
Jobs (train, ptq, generate, eval, bench) ask `family_of(pipe)` and never name `unet` themselves; adding a family
is one module under `quantune.families` plus its `register(...)` line (docs/architecture.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from quantune.errors import QuantuneError
from quantune.lora.config import ATTENTION_TARGETS, TEXT_ENCODER_TARGETS

# PATCH_EMBED_NOTE: a DiT's patch embedding (x_embedder / pos_embed.proj) keeps a float input: its K (C x p x p,
# 16-64) is too small for an int8 product to save anything, and its input, the latent x_t, spans the whole
# trajectory's range (on zoo:tiny-pixart, quantizing it took minmax W8A8 from 29.2 to 6.4 dB SQNR:
# benchmarks/results/dit_ptq_sqnr.md).
Conditioning = dict  # the denoiser's keyword arguments that come from the text (encoder states, added conditions)


class Family:
    """One model family (SD-1.x/2.x UNet, SDXL, ...); subclasses set the class attributes and override hooks."""

    name: ClassVar[str] = ""
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    denoiser_classes: ClassVar[tuple[str, ...]] = ()
    denoiser: ClassVar[str] = "unet"  # the pipeline attribute that holds the denoiser
    model_classes: ClassVar[tuple[str, ...]] = ()  # denoiser classes known for a bare model besides denoiser_classes
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    lora_text_encoders: ClassVar[tuple[str, ...] | None] = None  # those a text-encoder LoRA adapts (None: all)
    denoiser_targets: ClassVar[tuple[str, ...]] = tuple(ATTENTION_TARGETS)  # the LoRA default (lora.targets unset)
    attention_targets: ClassVar[tuple[str, ...]] = tuple(ATTENTION_TARGETS)  # lora.targets = "attention"
    text_encoder_targets: ClassVar[tuple[str, ...]] = tuple(TEXT_ENCODER_TARGETS)
    t5_tokens: ClassVar[int] = 0  # T5 families: the caption length the pipeline encodes (0: no T5)
    t5_tokenizer: ClassVar[str] = "tokenizer"  # the pipeline attribute holding T5's tokenizer
    objective: ClassVar[str] = "ddpm"  # the training objective: "ddpm" (epsilon / v) or "flow" (rectified flow)
    zoo: ClassVar[dict[str, Callable]] = {}  # zoo name -> builder of a pipeline of this family
    ptq_keep_8bit: ClassVar[tuple[str, ...]] = ()  # PTQ: layers whose weights stay 8-bit (names, suffixes, regexes)
    ptq_act_fp: ClassVar[tuple[str, ...]] = ()  # PTQ: layers whose inputs stay float
    ptq_shared_inputs: ClassVar[tuple[str, ...]] = ()  # PTQ: denoiser inputs without a batch dim (FLUX's ids)

    # -- recognition and components ---------------------------------------------------------------------------
    def matches(self, pipe) -> bool:
        """True when `pipe` (a pipeline) is of this family: by pipeline class, else by its denoiser's class."""
        if type(pipe).__name__ in self.pipeline_classes:
            return True
        model = getattr(pipe, self.denoiser, None)
        return model is not None and type(model).__name__ in self.denoiser_classes and self.extra_match(pipe)

    def extra_match(self, pipe) -> bool:
        """A further check when the denoiser class is shared between families (SD and SDXL UNets)."""
        return True

    def denoiser_of(self, pipe) -> nn.Module:
        model = getattr(pipe, self.denoiser, None)
        if model is None:
            raise QuantuneError(f"{type(pipe).__name__} has no {self.denoiser}: it is not a {self.name} pipeline")
        return model

    def text_encoders_of(self, pipe) -> dict[str, nn.Module]:
        """The pipeline's text encoders that are present, by component name (none for unconditional models)."""
        found = {name: getattr(pipe, name, None) for name in self.text_encoders}
        return {name: m for name, m in found.items() if isinstance(m, nn.Module)}

    def lora_text_encoders_of(self, pipe) -> dict[str, nn.Module]:
        """The text encoders a text-encoder LoRA (or full fine-tuning) may train: CLIP's, never T5."""
        names = self.text_encoders if self.lora_text_encoders is None else self.lora_text_encoders
        return {name: m for name, m in self.text_encoders_of(pipe).items() if name in names}

    def default_size(self, pipe) -> int:
        """The default image side in pixels: the denoiser's sample size times the VAE's scale factor."""
        return int(self.denoiser_of(pipe).config.sample_size) * int(getattr(pipe, "vae_scale_factor", 1))

    def max_tokens(self, pipe) -> int:
        """T5's caption length: the family's, or the tokenizer's when that is shorter (the tiny zoo models')."""
        tokenizer = getattr(pipe, self.t5_tokenizer, None)  # SD3 may ship without T5: the pipeline's default then
        return min(self.t5_tokens, int(tokenizer.model_max_length)) if tokenizer is not None else self.t5_tokens

    def guidance_kwargs(self, pipe, scale: float | None, batch: int) -> dict:
        """The pipeline-call arguments of classifier-free guidance at `scale` (None: the pipeline's default) for
        `batch` prompts: `guidance_scale` here; a family whose pipeline spells it otherwise overrides this."""
        return {} if scale is None else {"guidance_scale": scale}

    def call_kwargs(self, pipe) -> dict:
        """Extra keyword arguments every quantune call of this family's pipeline passes: T5's caption length, as
        training encodes it (and e.g. PixArt's `use_resolution_binning=False`)."""
        return {"max_sequence_length": self.max_tokens(pipe)} if self.t5_tokens else {}

    # -- conditioning and one training forward ----------------------------------------------------------------
    def condition(self, pipe, captions: list[str], size: tuple[int, int]) -> Conditioning:
        """Captions -> the denoiser's text conditioning (and added conditions for images of `size` (h, w) px),
        through the pipeline's own `encode_prompt`, with the gradient when a text encoder trains."""
        raise NotImplementedError

    def predict(
        self, pipe, model: nn.Module, noisy: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance=None
    ) -> torch.Tensor:
        """The denoiser's prediction [B, C, h, w] for noisy latents [B, C, h, w] at timesteps t (the scheduler's
        scale); `model` may be a wrapped denoiser; `guidance`: the distilled guidance of models that embed it."""
        return model(noisy.to(_dtype_of(cond, noisy)), t, **cond).sample

    # -- random inputs of the real shapes (benchmarks at real size, without the text encoders) ---------------
    def random_batch(
        self, model: nn.Module, batch: int, side: int, generator: torch.Generator, tokens: int | None = None
    ):
        """Seeded random (latents [B, C, side, side], integer timesteps, conditioning) of `model`'s input shapes:
        one training step's cost at real size without the text encoders (benchmarks). `tokens`: the caption length
        (default: the family's real one)."""
        x = torch.randn(batch, self.latent_channels(model), side, side, generator=generator)
        t = torch.randint(0, 1000, (batch,), generator=generator)
        return x, t, self.random_condition(model, batch, generator, tokens)

    def latent_channels(self, model: nn.Module) -> int:
        return int(model.config.in_channels)

    def random_condition(self, model: nn.Module, batch: int, generator: torch.Generator, tokens=None) -> Conditioning:
        """CLIP states [B, tokens (77), cross_attention_dim], as the UNet families take them."""
        shape = (batch, tokens or 77, model.config.cross_attention_dim)
        return {"encoder_hidden_states": torch.randn(shape, generator=generator)}

    # -- PTQ -------------------------------------------------------------------------------------------------
    def ptq_unit_types(self) -> tuple[type, ...]:
        """The module classes PTQ reconstructs block by block (BRECQ's units) in this family's denoiser."""
        raise QuantuneError(f"{self.name}: post-training quantization has no reconstruction units for this family")

    def tdac_feature_module(self, model: nn.Module) -> nn.Module:
        """The module whose input is TDAC's feature (EDA-DM, arXiv:2401.04585; docs/quantization.md). A diffusion
        transformer's: its middle `transformer_blocks` entry, whose input is the image tokens' residual stream
        halfway through the network, the DiT's counterpart of the UNet's bottleneck (calibration transposes its
        [B, tokens, C] to channels first)."""
        blocks = getattr(model, "transformer_blocks", None)
        if not blocks:
            raise QuantuneError(f"{self.name}: TDAC has no feature module for this family; use --method qdiffusion")
        return blocks[len(blocks) // 2]


def _dtype_of(cond: Conditioning, fallback: torch.Tensor) -> torch.dtype:
    states = cond.get("encoder_hidden_states")
    return states.dtype if isinstance(states, torch.Tensor) else fallback.dtype


class _Forwarding:
    """A wrapped module (e.g. accelerate's DDP wrapper) that calls through the wrapper and reads attributes of the
    inner module, so a pipeline's `encode_prompt` (which reads `.config` and `.dtype`) runs the wrapper."""

    def __init__(self, wrapper: nn.Module, inner: nn.Module) -> None:
        self._wrapper, self._inner = wrapper, inner

    def __call__(self, *args, **kwargs):
        return self._wrapper(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


@contextlib.contextmanager
def using_modules(pipe, modules: dict[str, nn.Module] | None):
    """Within the block, `pipe.<name>` calls `modules[name]` (a wrapped copy of the pipeline's own module)."""
    swapped = {}
    for name, module in (modules or {}).items():
        own = getattr(pipe, name)
        if module is not own:
            swapped[name] = own
            object.__setattr__(pipe, name, _Forwarding(module, own))  # no pipeline registration: restored below
    try:
        yield
    finally:
        for name, own in swapped.items():
            object.__setattr__(pipe, name, own)
