"""The original checkpoints' module names of the diffusion transformers (BFL's FLUX.1, Stability's MMDiT for SD3 /
SD3.5, PixArt's), which kohya sd-scripts' LoRA files ("lora_unet_" + the name with "_" for ".") and ComfyUI's
("diffusion_model." + the name) use, against diffusers' module paths.

An architecture is one module here (a `table(model)` of original name -> the diffusers paths it fuses, in row
order; see formats/fused.py) and one line in ARCHITECTURES, keyed by the diffusers model class. The tables are
checked against diffusers' own single-file converters (tests/formats/test_checkpoint_names.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from quantune.errors import QuantuneError
from quantune.formats.fused import Table


@dataclass(frozen=True)
class Architecture:
    """How one diffusion transformer's original checkpoint names its modules.

    `table(model)`: original name -> diffusers paths (the model's own blocks; a module the model lacks is not
    listed). `kohya`: kohya sd-scripts trains it, so its kohya names are real ones. `roots`: the first words of
    its blocks' original names (no other architecture's start so), to recognise a kohya or ComfyUI file of this
    architecture without the model. `t5_component`: the pipeline component that is T5 (kohya: lora_te3_). `rank_alpha`:
    modules whose alpha diffusers' reader drops, written with alpha = rank (the scale folded into down).
    `modelspec(model)`: the `modelspec.architecture` of a LoRA for it, as kohya sd-scripts writes it (None: kohya
    writes none).
    """

    name: str
    model_class: str
    table: Callable[[nn.Module], Table]
    roots: tuple[str, ...]
    modelspec: Callable[[nn.Module], str] | None = None
    kohya: bool = True
    t5_component: str | None = None
    rank_alpha: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if self.kohya and self.modelspec is None:
            raise QuantuneError(f"architecture {self.name}: a kohya architecture needs its modelspec name")
        if not self.roots:
            raise QuantuneError(f"architecture {self.name}: give the first words of its module names (roots)")


def blocks(model: nn.Module, attr: str, original: str, entries: dict[str, tuple[str, ...]]) -> Table:
    """Per-block entries "original.{i}.<name>" -> "attr.{i}.<diffusers path>" for every block of `model.<attr>`,
    listing only entries whose diffusers modules all exist in that block (SD3's last block has no context MLP)."""
    out: Table = {}
    for i, block in enumerate(getattr(model, attr, [])):
        present = {n for n, _ in block.named_modules()}
        for name, paths in entries.items():
            if all(p in present for p in paths):
                out[f"{original}.{i}.{name}"] = tuple(f"{attr}.{i}.{p}" for p in paths)
    return out


def existing(model: nn.Module, entries: dict[str, str]) -> Table:
    """1:1 entries outside the blocks, for the modules the model has (FLUX.1-schnell has no guidance embedder)."""
    present = {n for n, _ in model.named_modules()}
    return {name: (path,) for name, path in entries.items() if path in present}


def _registry() -> dict[str, Architecture]:
    from quantune.formats.checkpoint_names import flux, pixart, sd3

    return {a.model_class: a for a in (flux.ARCHITECTURE, sd3.ARCHITECTURE, pixart.ARCHITECTURE)}


def architecture_of(model: nn.Module | None) -> Architecture | None:
    """The registered architecture of a diffusers transformer, or None (a UNet, or none given)."""
    return None if model is None else _registry().get(type(model).__name__)


def architecture_in(names) -> Architecture | None:
    """The architecture whose blocks some of these module names (no prefix; "." or kohya's "_") are in, or None."""
    flat = [n.replace(".", "_") for n in names]
    for arch in _registry().values():
        roots = tuple(r + "_" for r in arch.roots)
        if any(n.startswith(roots) for n in flat):
            return arch
    return None
