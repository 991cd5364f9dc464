"""`quantune lora inspect | convert | merge | mix | embed | extract`: parses, calls the library, prints."""

from __future__ import annotations

import json

from quantune.cli_args import LORA_FORMATS, add_out, count, load_model, number, size_of
from quantune.errors import QuantuneError


def add_lora(sub) -> None:
    lora = sub.add_parser("lora", help="inspect, convert, merge, mix, extract, embed adapters").add_subparsers(
        dest="lora_command", required=True
    )
    i = lora.add_parser("inspect", help="format, ranks, alphas, module count, dtype and size")
    i.add_argument("file")
    i.add_argument("--model", help="for cloneofsimo / lora_wrapper files and a transformer's kohya / comfyui files")
    i.add_argument("--json", action="store_true", help="print JSON")

    c = lora.add_parser("convert", help="convert between quantune, diffusers, peft, kohya and comfyui")
    c.add_argument("input")
    c.add_argument("--to", required=True, choices=LORA_FORMATS)
    add_out(c)
    c.add_argument("--model", help="for cloneofsimo / lora_wrapper files, kohya names, any transformer's names")
    c.add_argument("--component", default="unet", help="part a bare peft folder or cloneofsimo .pt is for")

    m = lora.add_parser("merge", help="merge LoRAs into a base model and save a diffusers folder")
    m.add_argument("--model", required=True)
    m.add_argument("--lora", action="append", required=True, help="FILE[:SCALE] (repeatable)")
    add_out(m)

    x = lora.add_parser("mix", help="mix several LoRAs into one")
    x.add_argument("loras", nargs="+", help="FILE:WEIGHT")
    x.add_argument("--mode", required=True, choices=["sum", "concat", "svd"])
    x.add_argument("--rank", type=count(1))
    x.add_argument("--to", default="quantune", choices=LORA_FORMATS)
    x.add_argument("--model", help="for cloneofsimo / lora_wrapper inputs and a transformer's kohya / comfyui files")
    add_out(x)

    b = lora.add_parser("embed", help="a pipeline folder with the adapter in place (strength adjustable, trainable)")
    b.add_argument("--model", required=True)
    b.add_argument("--lora", required=True, help="FILE[:STRENGTH]")
    add_out(b)

    e = lora.add_parser("extract", help="extract a LoRA from two models (truncated SVD of the difference)")
    e.add_argument("--base", help="the base model (not needed when --tuned is a `lora embed` folder)")
    e.add_argument("--tuned", required=True, help="the fine-tuned model, or a `lora embed` folder (exact)")
    e.add_argument("--rank", type=count(1), help="the LoRA's rank (SVD extraction)")
    e.add_argument("--clamp-quantile", type=number, default=0.99)
    e.add_argument("--targets", nargs="*", help="module names or dotted suffixes to consider (default: all)")
    e.add_argument("--to", default="quantune", choices=LORA_FORMATS)
    add_out(e)


def cmd_inspect(a) -> None:
    from quantune.formats import read_lora
    from quantune.formats.inspect import describe
    from quantune.io import human_size

    pipe = load_model(a.model)
    weights, fmt, meta = read_lora(a.file, pipe)
    info = describe(weights, fmt, a.file, meta)
    if a.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return
    print(f"{info['path']}: {info['format']} LoRA, {human_size(info['size_bytes'])}")
    for key in (
        "modules",
        "adapter_types",
        "factors",
        "components",
        "layer_kinds",
        "ranks",
        "alphas",
        "dtype",
        "parameters",
    ):
        print(f"  {key:12s} {info[key]}")


def cmd_convert(a) -> None:
    from quantune.formats import lora_output, read_lora, write_lora

    lora_output(a.out, a.to, a.overwrite)
    pipe = load_model(a.model)
    weights, fmt, meta = read_lora(a.input, pipe, a.component)
    out = write_lora(weights, a.out, a.to, meta.get("lora_config"), pipe, a.overwrite)
    print(f"{fmt} -> {a.to}: {len(weights)} modules, wrote {out} ({size_of(out)})")


def cmd_merge(a) -> None:
    from quantune.formats import read_lora
    from quantune.generate import LoraSpec
    from quantune.io import DIFFUSERS_FOLDER, atomic_dir, check_output
    from quantune.lora.merge import merge_into

    check_output(a.out, a.overwrite, DIFFUSERS_FOLDER)
    pipe = load_model(a.model, merged=True)
    loras = []
    for spec in map(LoraSpec.parse, a.lora):
        if len(spec.scales) != 1:
            raise QuantuneError("lora merge takes one scale per LoRA (FILE:SCALE)")
        loras.append((read_lora(spec.path, pipe)[0], spec.scales[0]))
    n = merge_into(pipe, loras)
    with atomic_dir(a.out, DIFFUSERS_FOLDER, a.overwrite) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    print(f"merged {len(loras)} LoRA(s) into {n} modules; wrote diffusers folder {a.out} ({size_of(a.out)})")


def cmd_mix(a) -> None:
    from quantune.formats import lora_output, read_lora, write_lora
    from quantune.generate import LoraSpec
    from quantune.lora.merge import mix

    lora_output(a.out, a.to, a.overwrite)
    pipe = load_model(a.model)
    specs = [LoraSpec.parse(s) for s in a.loras]
    if any(len(s.scales) != 1 for s in specs):
        raise QuantuneError("lora mix takes FILE:WEIGHT with one weight each")
    mixed, report = mix([(read_lora(s.path, pipe)[0], s.scales[0]) for s in specs], a.mode, a.rank)
    out = write_lora(mixed, a.out, a.to, pipe=pipe, overwrite=a.overwrite)
    ranks = sorted({m.rank for m in mixed.values()})
    print(f"mixed {len(specs)} LoRAs ({a.mode}): {len(mixed)} modules, rank(s) {ranks}; wrote {out} ({size_of(out)})")
    if a.mode == "svd":
        print(f"  relative error ||dW - BA|| / ||dW||: max {report.max_error:.3g}, mean {report.mean_error:.3g}")
    elif a.mode == "sum":
        print("  note: sum mixes the factors (cloneofsimo), not the deltas; use concat or svd for the exact sum")


def cmd_embed(a) -> None:
    from quantune.formats import read_lora
    from quantune.generate import LoraSpec
    from quantune.io import DIFFUSERS_FOLDER, check_output
    from quantune.models.embedded import save_embedded

    check_output(a.out, a.overwrite, DIFFUSERS_FOLDER)
    spec = LoraSpec.parse(a.lora)
    if len(spec.scales) != 1:
        raise QuantuneError("lora embed takes one strength (FILE:STRENGTH)")
    pipe = load_model(a.model, merged=True)
    weights = read_lora(spec.path, pipe)[0]
    out = save_embedded(pipe, weights, a.out, spec.scales[0], a.overwrite)
    kinds = ", ".join(sorted({getattr(m, "label", m.kind) for m in weights.values()}))
    print(f"embedded {len(weights)} {kinds} modules at strength {spec.scales[0]:g}; wrote {out} ({size_of(out)})")


def cmd_extract(a) -> None:
    from quantune.formats import lora_output, write_lora
    from quantune.lora.merge import extract
    from quantune.models.embedded import embedded_adapter, is_embedded

    lora_output(a.out, a.to, a.overwrite)
    if is_embedded(a.tuned) and a.base is None:  # the adapter a `lora embed` folder keeps, exactly
        weights, _ = embedded_adapter(a.tuned)
        out = write_lora(weights, a.out, a.to, pipe=load_model(a.tuned, merged=True), overwrite=a.overwrite)
        print(f"extracted the embedded adapter ({len(weights)} modules, exact); wrote {out} ({size_of(out)})")
        return
    if a.base is None or a.rank is None:
        raise QuantuneError("lora extract needs --base and --rank (or --tuned a `lora embed` folder, without --base)")
    base = load_model(a.base, merged=True)
    weights, report = extract(base, load_model(a.tuned, merged=True), a.rank, a.clamp_quantile, targets=a.targets)
    out = write_lora(weights, a.out, a.to, pipe=base, overwrite=a.overwrite)
    print(f"extracted {len(weights)} modules at rank {a.rank}; wrote {out} ({size_of(out)})")
    print(f"  relative error ||dW - BA|| / ||dW||: max {report.max_error:.3g}, mean {report.mean_error:.3g}")


COMMANDS = {
    "inspect": cmd_inspect,
    "convert": cmd_convert,
    "merge": cmd_merge,
    "mix": cmd_mix,
    "extract": cmd_extract,
    "embed": cmd_embed,
}
