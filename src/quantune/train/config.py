"""The trainer's configuration: TOML validated into typed dataclasses, with dotted `--set key=value` overrides.

Every unknown key or bad value is a QuantuneError naming the key and what is allowed, raised before any model
loads. `resolve_config(path, overrides)` is the one entry point; `TrainConfig.to_dict()` is what the run saves.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from quantune.errors import QuantuneError
from quantune.lora.config import ATTENTION_TARGETS, TEXT_ENCODER_TARGETS, LoraConfig
from quantune.quant.config import ActQuant, WeightQuant
from quantune.quant.primitives import check_bits
from quantune.train.flow_matching import WEIGHTING_SCHEMES

TASKS = ("dreambooth", "text-to-image", "full", "autoencoder")
METHODS = ("lora", "full", "qlora", "intlora-mul", "intlora-shift")  # train/methods.py, train/quant_methods.py
QUANT_METHODS = ("qlora", "intlora-mul", "intlora-shift")
TARGETS_ATTENTION = "attention"  # lora.targets: the family's attention projections only (Family.attention_targets)
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise QuantuneError(f"{name} = {value!r} is not allowed: choose one of {', '.join(map(str, allowed))}")


def _positive(name: str, value, zero_ok: bool = False) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not zero_ok)
    ):
        raise QuantuneError(f"{name} = {value!r} must be a {'non-negative' if zero_ok else 'positive'} number")


@dataclass
class ModelConfig:
    pretrained: str = "zoo:tiny"  # zoo:NAME, a diffusers folder or a hub id

    def __post_init__(self) -> None:
        if not self.pretrained:
            raise QuantuneError("model.pretrained is empty: give zoo:tiny, a diffusers folder or a hub id")


@dataclass
class DataConfig:
    source: str = "openmoji"  # openmoji | folder (captioned) | dreambooth (instance folder)
    path: str = ""  # the folder for source = folder / dreambooth
    subset: str | int | list[str] | None = None  # openmoji: N, a caption regex, or a list
    resolution: int = 32
    instance_prompt: str = ""  # dreambooth
    class_prompt: str = ""  # dreambooth with prior preservation
    class_dir: str = ""  # where generated class images are cached (default: OUTPUT/class_images)
    num_class_images: int = 0  # 0: no prior preservation
    prior_loss_weight: float = 1.0
    caption_column: str = "text"
    random_flip: bool = False
    cache_latents: bool = False
    cache_text_embeddings: bool = False  # every caption's conditioning once, before training (frozen encoders)
    caption_dropout: float = 0.0  # share of captions replaced by "" so classifier-free guidance has an unconditional

    def __post_init__(self) -> None:
        _choice("data.source", self.source, ("openmoji", "folder", "dreambooth"))
        _positive("data.resolution", self.resolution)
        _positive("data.num_class_images", self.num_class_images, zero_ok=True)
        if not 0.0 <= self.caption_dropout < 1.0:
            raise QuantuneError(f"data.caption_dropout = {self.caption_dropout!r} must be in [0, 1)")
        if self.source in ("folder", "dreambooth") and not self.path:
            raise QuantuneError(f"data.path is required for data.source = {self.source!r}")
        if self.source == "dreambooth" and not self.instance_prompt:
            raise QuantuneError("data.instance_prompt is required for dreambooth (e.g. 'a sks emoji')")
        if self.num_class_images and not self.class_prompt:
            raise QuantuneError("data.class_prompt is required when data.num_class_images > 0 (prior preservation)")
        if self.random_flip and self.cache_latents:
            raise QuantuneError("data.random_flip and data.cache_latents exclude each other: cached latents are fixed")


@dataclass
class LoraSection:
    """The [lora] section: LoraConfig's fields (type lora / loha / lokr / dora and their options) plus the
    text-encoder LoRA's."""

    type: str = "lora"  # "loha", "lokr" (LyCORIS), "dora" (LoRA + DoRA); IntLoRA trains LoRA only
    dora: bool = False  # DoRA's decomposition on a LoHa / LoKr too
    factor: int = -1  # LoKr's Kronecker factor
    decompose_both: bool = False  # LoKr: the small factor low-rank too
    use_tucker: bool = False  # LoHa / LoKr: Tucker cores on convs with a kernel
    r: int = 4
    alpha: float | None = None
    # None: the model family's default (quantune.families: e.g. attention q / k / v / out on a UNet, FLUX's attention
    # and feed-forwards); "attention": the family's attention projections only; else peft's rules (lora/config.py)
    targets: str | list[str] | None = None
    exclude: str | list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    dropout: float = 0.0
    use_rslora: bool = False
    trainable_scale: bool = False
    init: str = "kaiming"
    conv_mode: str = "hard"
    text_encoder: bool = False  # also a LoRA on the text encoder
    text_encoder_r: int = 4
    text_encoder_targets: list[str] | None = None  # None: the model family's (CLIP attention q/k/v/out)

    def __post_init__(self) -> None:
        self.denoiser_config()  # validates through LoraConfig

    def denoiser_config(self, family=None, seed: int | None = None) -> LoraConfig:
        """The denoiser's LoraConfig; `targets` None or "attention" read from `family` (a quantune.families
        Family; None: a UNet's, ATTENTION_TARGETS)."""
        fields = {f.name for f in dataclasses.fields(LoraConfig)}
        kwargs = {k: v for k, v in dataclasses.asdict(self).items() if k in fields}
        if self.targets is None or self.targets == TARGETS_ATTENTION:
            name = "attention_targets" if self.targets == TARGETS_ATTENTION else "denoiser_targets"
            kwargs["targets"] = list(getattr(family, name, ATTENTION_TARGETS))
        return LoraConfig(**kwargs, seed=seed)

    def text_encoder_config(self, default_targets=TEXT_ENCODER_TARGETS, seed: int | None = None) -> LoraConfig:
        targets = list(default_targets) if self.text_encoder_targets is None else self.text_encoder_targets
        return LoraConfig(r=self.text_encoder_r, targets=targets, dropout=self.dropout, seed=seed)


@dataclass
class QuantSection:
    """The quantized base of qlora / intlora-mul / intlora-shift (QLoRA, Dettmers et al. 2023; IntLoRA, Guo et al.
    2024, arXiv 2410.21759; docs/intlora.md). The TOML keys stay flat; `weight` and `act` give them in the
    quantization core's vocabulary (quant/config.py: WeightQuant, ActQuant). `act_bits = 0` and `lora_bits = 0`,
    the spellings of older configs (TOML has no null), are read as None in __post_init__: weight-only, and U's
    bits equal to the base's."""

    bits: int = 8  # base weight bits, 2..8
    act_bits: int | None = None  # None (or 0): weights only; e.g. 8: W?A8 (per-tensor input fake-quant, calibrated)
    lora_bits: int | None = None  # IntLoRA-MUL: bits of U's quantizer (None or 0: the same as bits)
    vmc_alpha: float = 1.5  # IntLoRA's variance-matching exponent (not LoRA's alpha)
    zero_fix: str = "none"  # IntLoRA: "none" = the reference's zero-drop; "midrise" = quantune's fix
    shift_span: int = 15  # IntLoRA-SHIFT: exponents clamped to [k_max - shift_span, k_max] per row
    quantize_rest: bool = False  # also quantize every other UNet Linear / Conv2d at `bits` (as the reference)
    search: str = "l2.4"  # range search of weights and activations: l2.4 or minmax
    cache_aux: bool = True  # IntLoRA: keep R* in memory (fp16) instead of regenerating it every forward
    backward_dtype: str = "auto"  # dL/dx through the frozen integer weights: auto (bf16 where native), fp32, bf16
    calib_batches: int = 1  # activation ranges from the first N batches, each at its own timestep (1: the reference)

    def __post_init__(self) -> None:
        self.act_bits = self.act_bits or None  # 0: the older spelling of weight-only
        self.lora_bits = self.lora_bits or None
        check_bits(self.bits, "quant.bits")
        if self.act_bits is not None:
            check_bits(self.act_bits, "quant.act_bits", high=16)
        if self.lora_bits is not None:
            check_bits(self.lora_bits, "quant.lora_bits")
        _choice("quant.zero_fix", self.zero_fix, ("none", "midrise"))
        _choice("quant.search", self.search, ("l2.4", "minmax"))
        _choice("quant.backward_dtype", self.backward_dtype, ("auto", "fp32", "bf16"))
        _positive("quant.vmc_alpha", self.vmc_alpha)
        if not isinstance(self.shift_span, int) or not 1 <= self.shift_span <= 22:
            raise QuantuneError(f"quant.shift_span = {self.shift_span!r} must be an integer from 1 to 22")
        if isinstance(self.calib_batches, bool) or not isinstance(self.calib_batches, int) or self.calib_batches < 1:
            raise QuantuneError(f"quant.calib_batches = {self.calib_batches!r} must be a whole number of at least 1")

    @property
    def weight(self):
        """The base weights' WeightQuant (per output row, asymmetric, `search`)."""

        return WeightQuant(self.bits, search=self.search)

    @property
    def act(self):
        """The layer inputs' ActQuant, or None (weight-only)."""

        return ActQuant(self.act_bits, self.search) if self.act_bits is not None else None


@dataclass
class OptimConfig:
    lr: float = 1e-4
    text_encoder_lr: float | None = None
    weight_decay: float = 1e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    use_8bit_adam: bool = False  # needs bitsandbytes and CUDA
    scheduler: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        _positive("optim.lr", self.lr)
        _choice("optim.scheduler", self.scheduler, SCHEDULERS)
        _positive("optim.warmup_steps", self.warmup_steps, zero_ok=True)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise QuantuneError(f"optim.betas = {self.betas!r} must be two numbers in [0, 1)")


@dataclass
class TrainSection:
    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16 (GPU); CPU runs fp32
    gradient_checkpointing: bool = False
    seed: int = 0
    min_snr_gamma: float | None = None  # min-SNR weighting (Hang et al. 2023), e.g. 5.0
    noise_offset: float = 0.0
    ema: bool = False
    ema_decay: float = 0.999
    train_text_encoder: bool = False  # full fine-tuning: also train the text encoder
    deterministic: bool = False  # torch.use_deterministic_algorithms (for bit-exact resume tests)
    kl_weight: float = 1e-6  # task = autoencoder: weight of the KL term
    # flow matching (SD3, FLUX; train/flow_matching.py): timestep density and loss weighting, as diffusers' scripts
    weighting_scheme: str = "none"  # none (uniform) | logit_normal | mode | sigma_sqrt | cosmap
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    guidance: float = 3.5  # the distilled guidance a FLUX-dev-style transformer is given while training

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            _positive(f"train.{name}", getattr(self, name))
        _choice("train.weighting_scheme", self.weighting_scheme, WEIGHTING_SCHEMES)
        _positive("train.logit_std", self.logit_std)
        _choice("train.mixed_precision", self.mixed_precision, ("no", "fp16", "bf16"))
        if self.min_snr_gamma is not None:
            _positive("train.min_snr_gamma", self.min_snr_gamma)
        if not 0 < self.ema_decay < 1:
            raise QuantuneError(f"train.ema_decay = {self.ema_decay!r} must be in (0, 1)")


@dataclass
class LogConfig:
    every: int = 10  # loss / lr to TensorBoard
    validation_every: int = 0  # 0: only at the end
    validation_prompts: list[str] = field(default_factory=lambda: ["cat face", "red apple", "rocket"])
    validation_images: int = 2  # per prompt
    validation_steps: int = 20  # sampler steps
    validation_guidance: float | None = None  # classifier-free guidance scale; None: the pipeline's default
    checkpoint_every: int = 0  # 0: no intermediate checkpoints
    keep_checkpoints: int = 2
    tensorboard: bool = True

    def __post_init__(self) -> None:
        _positive("log.every", self.every)
        for name in ("validation_every", "checkpoint_every"):
            _positive(f"log.{name}", getattr(self, name), zero_ok=True)
        _positive("log.keep_checkpoints", self.keep_checkpoints)


@dataclass
class TrainConfig:
    task: str = "text-to-image"
    method: str = "lora"
    output_dir: str = "outputs/train"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    quant: QuantSection = field(default_factory=QuantSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        _choice("task", self.task, TASKS)
        _choice("method", self.method, METHODS)
        if self.task == "full" and self.method != "full":
            raise QuantuneError("task = 'full' trains the whole UNet: set method = 'full' as well")
        if self.task == "dreambooth" and self.data.source != "dreambooth":
            raise QuantuneError("task = 'dreambooth' needs data.source = 'dreambooth' (an instance folder)")
        if self.data.cache_text_embeddings and (self.lora.text_encoder or self.train.train_text_encoder):
            raise QuantuneError(
                "data.cache_text_embeddings needs frozen text encoders: set lora.text_encoder and "
                "train.train_text_encoder to false, or do not cache"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, values: dict, prefix: str = ""):
    """Build dataclass `cls` from a dict, refusing unknown keys and values of the wrong type."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in known:
            raise QuantuneError(f"unknown config key {name!r}: allowed keys here are {', '.join(sorted(known))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise QuantuneError(f"config key {name!r} must be a table ([{name}])")
            kwargs[key] = _build(hint, value, f"{name}.")
        else:
            _check_type(name, value, hint)
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise QuantuneError(f"bad config under {prefix or 'the top level'}: {e}") from None


def _check_type(name: str, value, hint) -> None:
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, type(int | None)) else (hint,)
    for t in allowed:
        origin = typing.get_origin(t) or t
        if t is type(None) and value is None:
            return
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise QuantuneError(f"config key {name!r} = {value!r} must be a finite number")
            return
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if origin in (str, bool, list, dict) and isinstance(value, origin):
            return
    names = ", ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise QuantuneError(f"config key {name!r} = {value!r} has the wrong type: expected {names}")


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise QuantuneError(f"--set {item!r} must look like key=value (dotted keys, e.g. optim.lr=1e-4)")
        node = values
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise QuantuneError(f"--set {key}: {part!r} is not a table")
        node[parts[-1]] = _parse_value(raw.strip())
    return values


def config_from_dict(values: dict) -> TrainConfig:
    """A TrainConfig from a saved `to_dict()` (a run's config.json), validated as a TOML file would be."""
    return _build(TrainConfig, values)


def resolve_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a TOML config (or start from the defaults), apply --set overrides, validate everything."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise QuantuneError(f"{path} is a folder: give a TOML config file (configs/ has examples)")
        if not path.is_file():
            raise QuantuneError(f"no such config file: {path}")
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise QuantuneError(f"{path} is not UTF-8 text ({e.reason}): give a TOML config file") from None
        except tomllib.TOMLDecodeError as e:
            raise QuantuneError(f"{path} is not valid TOML: {e}") from None
    return _build(TrainConfig, apply_overrides(values, overrides or []))
