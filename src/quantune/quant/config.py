"""The quantization vocabulary shared by the quantization core, PTQ and the trainer's `[quant]` section.

- `WeightQuant`: how a weight is quantized (bits, per output channel or per tensor, symmetric or with a zero point,
  range search, int4 packing): uniform affine quantization with the L2.4 range search of Q-Diffusion (Li et al.
  2023, arXiv 2302.04304) and IntLoRA (Guo et al. 2024, arXiv 2410.21759); see quant/primitives.py.
- `ActQuant`: how a layer's input activation is quantized (bits, range search): per tensor, asymmetric, with static
  parameters from an explicit calibration pass. Weight-only quantization is "no ActQuant" (None), never bits 0.
- `QuantConfig`: which layers `quantize_` turns into integer layers, with which `WeightQuant` / `ActQuant`.

PTQConfig (ptq/config.py) and the trainer's QuantSection keep their flat, user-facing spellings (`wbits` / `abits`,
`bits` / `act_bits`) and convert them to these classes in their `__post_init__` (docs/quantization.md,
docs/intlora.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import InitVar, dataclass, field

from quantune.errors import QuantuneError
from quantune.quant.primitives import SEARCH_CANDIDATES, check_bits
from quantune.targets import select

SEARCHES = tuple(SEARCH_CANDIDATES)  # quant/primitives.py: search_qparams


def check_search(search: str, what: str = "search") -> str:
    if search not in SEARCHES:
        raise QuantuneError(f"{what} = {search!r} is not supported: use one of {', '.join(SEARCHES)}")
    return search


@dataclass(frozen=True)
class WeightQuant:
    """Weight quantization: `bits` 2..8 (4 or fewer stored two per byte when `pack`), one scale per output row
    (`per_channel`) or per tensor, symmetric (no zero point) or asymmetric, L2.4 or min-max range search."""

    bits: int = 8
    per_channel: bool = True
    symmetric: bool = False
    search: str = "l2.4"
    pack: bool = True

    def __post_init__(self) -> None:
        check_bits(self.bits, "weight bits")
        check_search(self.search)


@dataclass(frozen=True)
class ActQuant:
    """Activation quantization: `bits` 2..16, per tensor, asymmetric, range by L2.4 or min-max search over the
    calibration data (quant/act.py)."""

    bits: int = 8
    search: str = "l2.4"

    def __post_init__(self) -> None:
        check_bits(self.bits, "activation bits", high=16)
        check_search(self.search)


@dataclass
class QuantConfig:
    """Which layers `quantize_` turns into integer layers: `targets` None means every nn.Linear / nn.Conv2d (else
    peft-style names, lora.config), minus `exclude`; `weight` says how, `act` None keeps the inputs float.
    `bits=` / `act_bits=` are the short spelling of docs/intlora.md, converted in __post_init__: `weight` with those
    bits, and `act = ActQuant(act_bits)` (L2.4)."""

    weight: WeightQuant = field(default_factory=WeightQuant)
    act: ActQuant | None = None
    targets: str | list[str] | None = None
    exclude: str | list[str] | None = None
    bits: InitVar[int | None] = None
    act_bits: InitVar[int | None] = None

    def __post_init__(self, bits: int | None, act_bits: int | None) -> None:
        if bits is not None:
            self.weight = dataclasses.replace(self.weight, bits=bits)
        if act_bits is not None:
            self.act = ActQuant(act_bits)
        if not isinstance(self.weight, WeightQuant):
            raise QuantuneError(f"QuantConfig.weight must be a WeightQuant, not {type(self.weight).__name__}")
        if self.act is not None and not isinstance(self.act, ActQuant):
            raise QuantuneError(f"QuantConfig.act must be an ActQuant or None, not {type(self.act).__name__}")

    def is_target(self, name: str) -> bool:
        return select(name, self.targets, self.exclude)
