"""The command line's shared pieces: argument types, the --out / --overwrite pair, sizes, and loading a model
(cli.py and cli_lora.py use them)."""

from __future__ import annotations

import argparse
import logging
import math

LORA_FORMATS = ("quantune", "diffusers", "peft", "kohya", "comfyui")  # = formats.WRITABLE (kept light to import)

logger = logging.getLogger("quantune")


def add_out(parser: argparse.ArgumentParser, what: str = "--out") -> None:
    if what == "--out":
        parser.add_argument("--out", required=True)
    parser.add_argument("--overwrite", action="store_true", help=f"replace an existing {what} (never done silently)")


def number(text: str) -> float:
    """A finite float (argparse's `float` takes nan and inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


number.numeric = True


def count(low: int):
    """An integer of at least `low`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is less than {low}")
        return value

    parse.numeric = True  # tests/test_bad_input.py finds every numeric option by this
    return parse


def size_of(path) -> str:
    from quantune.formats.inspect import disk_size
    from quantune.io import human_size

    return human_size(disk_size(path))


def load_model(ref, merged: bool = False):
    """The pipeline `ref` on PyTorch's kernels (commands that merge, inspect, quantize or save it); `merged`: a
    `lora embed` folder's adapter folded into the weights (what the commands that write a model start from)."""
    if ref is None:
        return None
    from quantune.lora import lora_layers, remove_lora
    from quantune.lora.weights import components_of
    from quantune.models import load_pipeline

    pipe = load_pipeline(ref, backend="torch")
    if merged:
        for model in components_of(pipe).values():
            if lora_layers(model):
                remove_lora(model, merge=True)
                logger.info("%s: the embedded adapter is merged into the weights", ref)
    return pipe
