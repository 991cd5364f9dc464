"""LoraConfig: which modules get a LoRA, at what rank and scale, and how it is initialised.

Targets follow peft's rules: a string is a regex matched against the full module name (re.fullmatch); a list
matches a name exactly or as a dotted suffix ("to_q" matches "...attn1.to_q"). Exclusions are checked first and
take the same two forms. rank_pattern / alpha_pattern map a regex to a rank / alpha for the modules whose name
ends with it (peft: re.match(rf"(.*\\.)?({key})$", name)); the first key that matches wins.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Literal

from quantune.errors import QuantuneError
from quantune.targets import pattern_value, select

ADAPTER_TYPES = ("lora", "loha", "lokr", "dora")  # "dora": LoRA with DoRA's weight decomposition
ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # diffusers' DreamBooth LoRA, diffengine, IntLoRA
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIP attention


@dataclass
class LoraConfig:
    """Which modules get an adapter, of which type (`type`: LoRA, LyCORIS's LoHa / LoKr, or DoRA; `dora` adds
    DoRA's decomposition to LoHa / LoKr too), at what rank and scale, and how it is initialised."""

    type: str = "lora"
    r: int = 4
    alpha: float | None = None  # None: alpha = r (scale 1), as diffusers' training scripts do
    targets: str | list[str] = field(default_factory=lambda: list(ATTENTION_TARGETS))
    exclude: str | list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    dropout: float = 0.0
    use_rslora: bool = False  # scale = alpha / sqrt(r) instead of alpha / r
    trainable_scale: bool = False  # lora_wrapper: the scale is an nn.Parameter the optimizer updates
    init: Literal["kaiming", "gaussian"] = "kaiming"  # A init; B is always zero so the start is the base model
    conv_mode: Literal["hard", "soft"] = "hard"  # hard: mergeable LoCon; soft: parallel convs, not mergeable
    seed: int | None = None  # seeds the A init when given
    dora: bool = False  # DoRA's magnitude / direction decomposition on top of the adapter (type "dora": LoRA + it)
    factor: int = -1  # LoKr: the Kronecker factor's size (-1: as balanced as the dimension allows), LyCORIS's
    decompose_both: bool = False  # LoKr: the small factor low-rank too
    use_tucker: bool = False  # LoHa / LoKr on a conv with a kernel: a Tucker core per factor (LyCORIS's use_tucker)

    def __post_init__(self) -> None:
        if self.type not in ADAPTER_TYPES:
            raise QuantuneError(f"LoraConfig.type must be one of {', '.join(ADAPTER_TYPES)}, got {self.type!r}")
        if self.type == "dora":
            self.type, self.dora = "lora", True
        self._check_type_options()
        if not isinstance(self.factor, int) or self.factor == 0 or self.factor < -1:
            raise QuantuneError(f"LoraConfig.factor must be -1 or a positive integer, got {self.factor!r}")
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise QuantuneError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if self.alpha is not None and not float(self.alpha) > 0:
            raise QuantuneError(f"LoraConfig.alpha must be > 0 (or None for alpha = r), got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise QuantuneError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in ("kaiming", "gaussian"):
            raise QuantuneError(f"LoraConfig.init must be 'kaiming' or 'gaussian', got {self.init!r}")
        if self.conv_mode not in ("hard", "soft"):
            raise QuantuneError(f"LoraConfig.conv_mode must be 'hard' or 'soft', got {self.conv_mode!r}")
        if not self.targets:
            raise QuantuneError("LoraConfig.targets is empty: give a regex or a list of module names")
        for name, pattern in [("targets", self.targets), ("exclude", self.exclude)]:
            if isinstance(pattern, str):
                _compile(pattern, name)
        for key, value in self.rank_pattern.items():
            _compile(key, "rank_pattern")
            if not isinstance(value, int) or value < 1:
                raise QuantuneError(f"LoraConfig.rank_pattern[{key!r}] must be a positive integer, got {value!r}")
        for key, value in self.alpha_pattern.items():
            _compile(key, "alpha_pattern")
            if not float(value) > 0:
                raise QuantuneError(f"LoraConfig.alpha_pattern[{key!r}] must be > 0, got {value!r}")

    def _check_type_options(self) -> None:
        """Options of one adapter type given to another are refused, not ignored."""
        lora_only = self.trainable_scale or self.conv_mode != "hard" or self.dropout or self.use_rslora
        if self.type != "lora" and (lora_only or self.init != "kaiming"):
            raise QuantuneError(f"LoraConfig: trainable_scale, conv_mode 'soft', dropout, use_rslora and init are "
                                f"LoRA options, not {self.type}'s: unset them")  # fmt: skip
        if self.type != "lokr" and (self.factor != -1 or self.decompose_both):
            raise QuantuneError(f"LoraConfig: factor and decompose_both are LoKr options, not {self.type}'s")
        if self.type == "lora" and self.use_tucker:
            raise QuantuneError("LoraConfig.use_tucker is a LoHa / LoKr option: unset it for type 'lora'")

    # -- per-module choices ------------------------------------------------------------------------------------
    def is_target(self, name: str) -> bool:
        return select(name, self.targets, self.exclude)

    def rank_for(self, name: str) -> int:
        return pattern_value(self.rank_pattern, name, self.r)

    def alpha_for(self, name: str) -> float:
        default = float(self.alpha) if self.alpha is not None else None
        alpha = pattern_value(self.alpha_pattern, name, default)
        return float(alpha) if alpha is not None else float(self.rank_for(name))

    def scale_for(self, name: str) -> float:
        r = self.rank_for(name)
        return self.alpha_for(name) / (r**0.5 if self.use_rslora else r)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LoraConfig:
        return cls(**json.loads(text))


def _compile(pattern: str, what: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise QuantuneError(f"LoraConfig.{what}: {pattern!r} is not a valid regex ({e})") from None
