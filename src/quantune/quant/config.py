"""QuantConfig: which layers `quantize_` turns into integer layers, at what bits, with which quantizer."""

from __future__ import annotations

from dataclasses import dataclass

from quantune.errors import QuantuneError
from quantune.quant.primitives import check_bits
from quantune.targets import select


@dataclass
class QuantConfig:
    bits: int = 8  # weight bits, 2..8 (4 or fewer are stored two per byte when pack is true)
    act_bits: int | None = None  # None: weight-only; else every quantized layer fake-quantizes its input
    targets: str | list[str] | None = None  # None: every nn.Linear / nn.Conv2d; else peft-style (lora.config)
    exclude: str | list[str] | None = None
    per_channel: bool = True  # one scale per output row (False: one per tensor)
    symmetric: bool = False
    search: str = "l2.4"  # or "minmax"
    pack: bool = True

    def __post_init__(self) -> None:
        check_bits(self.bits, "bits")
        if self.act_bits is not None:
            check_bits(self.act_bits, "act_bits", high=16)
        if self.search not in ("l2.4", "minmax"):
            raise QuantuneError(f"search = {self.search!r} is not supported: use 'l2.4' or 'minmax'")

    def is_target(self, name: str) -> bool:
        return select(name, self.targets, self.exclude)
