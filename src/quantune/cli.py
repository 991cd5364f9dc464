"""The `quantune` command line: parses, calls the library, prints. No logic of its own.

Every QuantuneError is printed as one line `error: ...` with exit status 2; nothing half-written is left behind
(the library writes atomically).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys

from quantune.errors import QuantuneError, cause_chain
from quantune.logs import quiet_libraries

LORA_FORMATS = ("quantune", "diffusers", "peft", "kohya", "comfyui")  # = formats.WRITABLE (kept light to import)

logger = logging.getLogger("quantune")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="quantune", description="Fine-tune and compress diffusion models.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_train(sub)
    _add_lora(sub)
    _add_quantize(sub)
    _add_eval(sub)
    _add_bench(sub)
    _add_merges(sub)
    return p


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="generate images, optionally with LoRAs at one or several strengths")
    g.add_argument("--model", required=True, help="zoo:tiny, a diffusers folder, or a hub id")
    g.add_argument("--lora", action="append", default=[], help="FILE[:SCALE] or FILE:S1,S2,... (repeatable)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--steps", type=_count(1), default=20)
    g.add_argument("--seed", type=_count(0), default=0)
    g.add_argument("--size", type=_count(8), default=None, help="image side in px (default: the model's)")
    g.add_argument("--num-images", type=_count(1), default=1)
    g.add_argument("--guidance", type=_number, default=7.5)
    g.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="auto: fp16 on cuda")
    _add_backend(g)
    _add_out(g)


def _add_backend(p) -> None:
    why = "an integer model's engine: auto is OpenVINO on the CPU when installed, else PyTorch's kernels"
    p.add_argument("--backend", default="auto", choices=["auto", "openvino", "torch"], help=why)


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="train a LoRA or the full UNet from a TOML config")
    t.add_argument("config", nargs="?", help="a TOML file (configs/ has examples); defaults apply without one")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (dotted)")
    t.add_argument("--resume", help="latest, or a checkpoint folder name (step-000100)")
    _add_out(t, "output_dir (a previous run there)")


def _add_lora(sub) -> None:
    lora = sub.add_parser("lora", help="inspect, convert, merge, mix and extract LoRAs").add_subparsers(
        dest="lora_command", required=True
    )
    i = lora.add_parser("inspect", help="format, ranks, alphas, module count, dtype and size")
    i.add_argument("file")
    i.add_argument("--model", help="for cloneofsimo / lora_wrapper files and a transformer's kohya / comfyui files")
    i.add_argument("--json", action="store_true", help="print JSON")

    c = lora.add_parser("convert", help="convert between quantune, diffusers, peft, kohya and comfyui")
    c.add_argument("input")
    c.add_argument("--to", required=True, choices=LORA_FORMATS)
    _add_out(c)
    c.add_argument("--model", help="for cloneofsimo / lora_wrapper files, kohya names, any transformer's names")
    c.add_argument("--component", default="unet", help="part a bare peft folder or cloneofsimo .pt is for")

    m = lora.add_parser("merge", help="merge LoRAs into a base model and save a diffusers folder")
    m.add_argument("--model", required=True)
    m.add_argument("--lora", action="append", required=True, help="FILE[:SCALE] (repeatable)")
    _add_out(m)

    x = lora.add_parser("mix", help="mix several LoRAs into one")
    x.add_argument("loras", nargs="+", help="FILE:WEIGHT")
    x.add_argument("--mode", required=True, choices=["sum", "concat", "svd"])
    x.add_argument("--rank", type=_count(1))
    x.add_argument("--to", default="quantune", choices=LORA_FORMATS)
    x.add_argument("--model", help="for cloneofsimo / lora_wrapper inputs and a transformer's kohya / comfyui files")
    _add_out(x)

    b = lora.add_parser("embed", help="a pipeline folder with the adapter in place (strength adjustable, trainable)")
    b.add_argument("--model", required=True)
    b.add_argument("--lora", required=True, help="FILE[:STRENGTH]")
    _add_out(b)

    e = lora.add_parser("extract", help="extract a LoRA from two models (truncated SVD of the difference)")
    e.add_argument("--base", help="the base model (not needed when --tuned is a `lora embed` folder)")
    e.add_argument("--tuned", required=True, help="the fine-tuned model, or a `lora embed` folder (exact)")
    e.add_argument("--rank", type=_count(1), help="the LoRA's rank (SVD extraction)")
    e.add_argument("--clamp-quantile", type=_number, default=0.99)
    e.add_argument("--targets", nargs="*", help="module names or dotted suffixes to consider (default: all)")
    e.add_argument("--to", default="quantune", choices=LORA_FORMATS)
    _add_out(e)


def _add_quantize(sub) -> None:
    q = sub.add_parser("quantize", help="post-training quantization of the denoiser into an integer model")
    q.add_argument("--model", required=True, help="zoo:emoji, a diffusers folder, or a hub id")
    q.add_argument("--method", default="eda-dm", help="eda-dm, qdiffusion, minmax (ptq/methods: any registered)")
    q.add_argument("--wbits", type=_count(1), default=8, help="weight bits: 2..8 (8: symmetric int8)")
    q.add_argument("--abits", type=_bits_or_none, default=8, help="activation bits, or none for weight-only")
    q.add_argument("--attn-bits", type=_bits_or_none, default=8, help="q/k/v/softmax bits, or none (float)")
    q.add_argument("--smooth", type=_number, help="SmoothQuant's alpha in [0, 1] (0.5: the paper's); default off")
    q.add_argument("--calib-samples", type=_count(1), default=256, help="calibration trajectories N")
    q.add_argument("--steps", type=_count(1), default=20, help="sampler steps of the calibration trajectories")
    q.add_argument("--iters", type=_count(0), default=1000, help="reconstruction iterations per block")
    q.add_argument("--batch-size", type=_count(1), default=32)
    q.add_argument("--keep-fp", action="append", default=[], help="layer name or regex left in float (repeatable)")
    q.add_argument("--prompts", help="calibration prompts, one per line (default: OpenMoji captions)")
    q.add_argument("--resolution", type=_count(8), help="calibration image size in px (default: the model's)")
    q.add_argument("--lr-w", type=_number, help="AdaRound learning rate (default by bits, docs/quantization.md)")
    q.add_argument("--lr-a", type=_number, default=1e-3, help="activation step-size learning rate (relative)")
    q.add_argument("--tdac-r", type=_number, default=0.3, help="TDAC radius: 0.3 LSUN / COCO, 3.0 CIFAR / ImageNet")
    q.add_argument("--tdac-lambda", type=_number, default=5.0, help="TDAC variety weight: 5 COCO, 1 LSUN, 1.2 CIFAR")
    q.add_argument("--add-loss", type=_number, default=0.8, help="FBR's inner-layer weight (eda-dm)")
    q.add_argument("--qdrop", type=_number, default=0.5, help="QDrop probability (eda-dm)")
    q.add_argument("--round-reg", type=_number, default=0.01, help="AdaRound regulariser weight (0: EDA-DM's ref.)")
    q.add_argument("--guidance", type=_number, help="calibration sampler's guidance (default: the pipeline's own)")
    q.add_argument("--seed", type=_count(0), default=0)
    _add_out(q)


def _add_eval(sub) -> None:
    ev = sub.add_parser(
        "eval", help="generate for a prompt set and score: FID, glyph, CLIP-T/I, DINO, PSNR, SSIM, LPIPS"
    )
    ev.add_argument("--model", required=True)
    ev.add_argument("--lora", action="append", default=[], help="FILE[:SCALE] (repeatable)")
    ev.add_argument("--prompts", default="builtin", help="builtin (OpenMoji captions) or a file, one per line")
    ev.add_argument("--metrics", default="fid", help="comma-separated: fid,glyph,clip-t,clip-i,dino,lpips,psnr,ssim")
    ev.add_argument("--n", type=_count(0), default=64, help="number of prompts (builtin: drawn with the seed; 0: all)")
    ev.add_argument("--steps", type=_count(1), default=20)
    ev.add_argument("--guidance", type=_number, default=7.5)
    ev.add_argument("--size", type=_count(8), help="image side in px (default: the model's)")
    ev.add_argument("--seed", type=_count(0), default=0, help="image i uses seed + i")
    ev.add_argument("--reference", help="folder of real images for FID (builtin prompts: their glyphs)")
    ev.add_argument("--instance", help="folder of subject images for clip-i / dino")
    ev.add_argument("--compare-model", help="model whose same-seed samples psnr / ssim / lpips compare against")
    ev.add_argument("--feature", default="openmoji", help="FID features: openmoji or a local CLIP folder")
    ev.add_argument("--clip", help="local CLIPModel folder (clip-t, clip-i)")
    ev.add_argument("--dino", help="local DINO / DINOv2 folder")
    ev.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1, ...")
    _add_backend(ev)
    _add_out(ev)


def _add_bench(sub) -> None:
    b = sub.add_parser("bench", help="the benchmark tables vs the peers (one process per table) and the report")
    b.add_argument("--quick", action="store_true", help="small settings: under 15 minutes on a 2-core CPU")
    b.add_argument("--only", help="comma-separated tables (default: all): training,dit_training,files,inference,...")
    b.add_argument("--report-only", action="store_true", help="rewrite the report from the tables already in --out")
    b.add_argument("--readme", help="then write the report into this README's marked results section")
    b.add_argument("--link", help="the --out folder as the README links it (default: relative to the README)")
    _add_out(b)


def _add_merges(sub) -> None:
    for family, what in (("intlora", "IntLoRA: integer products / shifts, no PTQ"), ("qlora", "QLoRA + PTQ")):
        fam = sub.add_parser(family, help=f"merge a {family} run into an integer model ({what})")
        fm = fam.add_subparsers(dest=f"{family}_command", required=True).add_parser(
            "merge", help="write a diffusers folder whose UNet holds integer weights"
        )
        fm.add_argument("run_dir", help="the training run's output_dir")
        _add_out(fm)
        fm.set_defaults(family=family)


def _add_out(parser: argparse.ArgumentParser, what: str = "--out") -> None:
    if what == "--out":
        parser.add_argument("--out", required=True)
    parser.add_argument("--overwrite", action="store_true", help=f"replace an existing {what} (never done silently)")


def _number(text: str) -> float:
    """A finite float (argparse's `float` takes nan and inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


_number.numeric = True


def _count(low: int):
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


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one `error:` line like every other error (the usage is in --help)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _bits_or_none(text: str) -> int | None:
    if text.lower() in ("none", "fp", "float", "16", "32"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a bit width: give an integer or none") from None


def _size(path) -> str:
    from quantune.formats.inspect import disk_size
    from quantune.io import human_size

    return human_size(disk_size(path))


def cmd_generate(a) -> None:
    from quantune.generate import MARKERS, LoraSpec, attach_loras, generate
    from quantune.io import check_output
    from quantune.models import load_pipeline, resolve_device
    from quantune.models.deploy import describe_backend
    from quantune.models.loading import to_device

    check_output(a.out, a.overwrite, MARKERS)
    device, dtype = resolve_device(a.device, a.dtype)
    pipe = load_pipeline(a.model, torch_dtype=dtype, backend="torch")  # LoRAs attach to the PyTorch model
    scales = attach_loras(pipe, [LoraSpec.parse(s) for s in a.lora])
    to_device(pipe, device, a.backend)  # integer kernels of the new device; OpenVINO on the CPU ("auto")
    paths = generate(
        pipe, a.prompt, a.out, scales, a.steps, a.seed, a.size, a.num_images, a.guidance, overwrite=a.overwrite
    )
    print(f"wrote {len(paths) - 1} image(s) and {paths[-1]} ({len(scales)} row(s): strengths {scales}); "
          f"denoiser: {describe_backend(pipe)}")  # fmt: skip


def cmd_train(a) -> None:
    from quantune.train.config import resolve_config
    from quantune.train.trainer import train

    cfg = resolve_config(a.config, a.set)
    result = train(cfg, resume=a.resume, overwrite=a.overwrite)
    if result.outputs:
        print(
            f"trained {result.steps} steps in {result.seconds:.0f} s (final loss {result.final_loss:.4f}, "
            f"peak memory {result.peak_memory_mb:.0f} MB)"
        )
        for path in result.outputs:
            print(f"  {path} ({_size(path)})")


def cmd_quantize(a) -> None:
    from quantune.families import family_of
    from quantune.io import DIFFUSERS_FOLDER, check_output
    from quantune.ptq import PTQConfig, quantize_pipeline, read_prompts, save_ptq_pipeline
    from quantune.quant.kernels import prepare_int_kernels

    cfg = PTQConfig(
        method=a.method, wbits=a.wbits, abits=a.abits, attn_bits=a.attn_bits, calib_samples=a.calib_samples,
        steps=a.steps, iters=a.iters, batch_size=a.batch_size, keep_fp=a.keep_fp, resolution=a.resolution,
        lr_w=a.lr_w, lr_a=a.lr_a, seed=a.seed, tdac_r=a.tdac_r, tdac_lambda=a.tdac_lambda, add_loss=a.add_loss,
        qdrop=a.qdrop, round_reg=a.round_reg, guidance_scale=a.guidance, smooth=a.smooth,
    )  # fmt: skip
    check_output(a.out, a.overwrite, DIFFUSERS_FOLDER)
    prompts = read_prompts(a.prompts) if a.prompts else None
    pipe = _load(a.model)
    report = quantize_pipeline(pipe, cfg, prompts)
    out = save_ptq_pipeline(pipe, a.out, report, a.overwrite)
    family = family_of(pipe)
    ways = prepare_int_kernels(family.denoiser_of(pipe))
    unet_bytes = sum(p.stat().st_size for p in (out / family.denoiser).glob("*.safetensors"))
    bits = f"W{cfg.wbits}A{cfg.abits or 16}"
    print(f"{cfg.method} {bits}: {report['layers']} layers, {report['units']} units, {report['seconds']:.0f} s")
    print(f"  calibration samples per step: {report['samples_per_step']}")
    print(f"  integer kernels (CPU): {', '.join(f'{n} {k}' for k, n in sorted(ways.items()))}")
    print(
        f"  {family.denoiser} weights on disk: {_human(unet_bytes)} (fp32: {_human(report['fp32_unet_bytes'])}, "
        f"{report['fp32_unet_bytes'] / unet_bytes:.2f}x smaller); wrote {out} ({_size(out)})"
    )


def _human(n: int) -> str:
    from quantune.io import human_size

    return human_size(n)


def cmd_eval(a) -> None:
    from quantune.eval.run import EvalConfig, evaluate

    cfg = EvalConfig(
        metrics=[m.strip() for m in a.metrics.split(",") if m.strip()], prompts=a.prompts, n=a.n, steps=a.steps,
        guidance_scale=a.guidance, size=a.size, seed=a.seed, reference=a.reference, instance=a.instance,
        compare_model=a.compare_model, feature=a.feature, clip=a.clip, dino=a.dino, backend=a.backend,
    )  # fmt: skip
    from quantune.models import resolve_device

    result = evaluate(a.model, cfg, a.out, a.lora, device=resolve_device(a.device, "fp32")[0], overwrite=a.overwrite)
    figures = ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float) and k != "seconds")
    print(f"{result['n_images']} images, {figures}; wrote {a.out} ({result['seconds']:.0f} s)")


def cmd_bench(a) -> None:
    from quantune.bench import check_readme, run_bench, update_readme, write_report

    if a.readme:
        check_readme(a.readme)  # before the benchmark, not after it
    only = [t.strip() for t in a.only.split(",") if t.strip()] if a.only else None
    report = write_report(a.out) if a.report_only else run_bench(a.out, a.quick, only, a.overwrite)
    if a.readme:
        link = a.link or os.path.relpath(a.out, os.path.dirname(os.path.abspath(a.readme)))
        update_readme(a.readme, a.out, link)
    print(f"wrote {report} and {report.with_suffix('.html')}" + (f"; updated {a.readme}" if a.readme else ""))


def cmd_inspect(a) -> None:
    from quantune.formats import read_lora
    from quantune.formats.inspect import describe
    from quantune.io import human_size

    pipe = _load(a.model)
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


def _load(ref):
    if ref is None:
        return None
    from quantune.models import load_pipeline

    return load_pipeline(ref, backend="torch")  # merged, inspected, quantized: the PyTorch model


def cmd_convert(a) -> None:
    from quantune.formats import lora_output, read_lora, write_lora

    lora_output(a.out, a.to, a.overwrite)
    pipe = _load(a.model)
    weights, fmt, meta = read_lora(a.input, pipe, a.component)
    out = write_lora(weights, a.out, a.to, meta.get("lora_config"), pipe, a.overwrite)
    print(f"{fmt} -> {a.to}: {len(weights)} modules, wrote {out} ({_size(out)})")


def cmd_int_merge(a) -> None:
    from quantune.train.merge_run import merge_run

    out, n = merge_run(a.run_dir, a.out, a.family, a.overwrite)
    print(f"merged {n} {a.family} layers into integers; wrote diffusers folder {out} ({_size(out)})")


def cmd_merge(a) -> None:
    from quantune.formats import read_lora
    from quantune.generate import LoraSpec
    from quantune.io import DIFFUSERS_FOLDER, atomic_dir, check_output
    from quantune.lora.merge import merge_into

    check_output(a.out, a.overwrite, DIFFUSERS_FOLDER)
    pipe = _load(a.model)
    loras = []
    for spec in map(LoraSpec.parse, a.lora):
        if len(spec.scales) != 1:
            raise QuantuneError("lora merge takes one scale per LoRA (FILE:SCALE)")
        loras.append((read_lora(spec.path, pipe)[0], spec.scales[0]))
    n = merge_into(pipe, loras)
    with atomic_dir(a.out, DIFFUSERS_FOLDER, a.overwrite) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    print(f"merged {len(loras)} LoRA(s) into {n} modules; wrote diffusers folder {a.out} ({_size(a.out)})")


def cmd_mix(a) -> None:
    from quantune.formats import lora_output, read_lora, write_lora
    from quantune.generate import LoraSpec
    from quantune.lora.merge import mix

    lora_output(a.out, a.to, a.overwrite)
    pipe = _load(a.model)
    specs = [LoraSpec.parse(s) for s in a.loras]
    if any(len(s.scales) != 1 for s in specs):
        raise QuantuneError("lora mix takes FILE:WEIGHT with one weight each")
    mixed, report = mix([(read_lora(s.path, pipe)[0], s.scales[0]) for s in specs], a.mode, a.rank)
    out = write_lora(mixed, a.out, a.to, pipe=pipe, overwrite=a.overwrite)
    ranks = sorted({m.rank for m in mixed.values()})
    print(f"mixed {len(specs)} LoRAs ({a.mode}): {len(mixed)} modules, rank(s) {ranks}; wrote {out} ({_size(out)})")
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
    pipe = _load(a.model)
    weights = read_lora(spec.path, pipe)[0]
    out = save_embedded(pipe, weights, a.out, spec.scales[0], a.overwrite)
    kinds = ", ".join(sorted({getattr(m, "label", m.kind) for m in weights.values()}))
    print(f"embedded {len(weights)} {kinds} modules at strength {spec.scales[0]:g}; wrote {out} ({_size(out)})")


def cmd_extract(a) -> None:
    from quantune.formats import lora_output, write_lora
    from quantune.lora.merge import extract
    from quantune.models.embedded import embedded_adapter, is_embedded

    lora_output(a.out, a.to, a.overwrite)
    if is_embedded(a.tuned) and a.base is None:  # the adapter a `lora embed` folder keeps, exactly
        weights, _ = embedded_adapter(a.tuned)
        out = write_lora(weights, a.out, a.to, pipe=_load(a.tuned), overwrite=a.overwrite)
        print(f"extracted the embedded adapter ({len(weights)} modules, exact); wrote {out} ({_size(out)})")
        return
    if a.base is None or a.rank is None:
        raise QuantuneError("lora extract needs --base and --rank (or --tuned a `lora embed` folder, without --base)")
    base = _load(a.base)
    weights, report = extract(base, _load(a.tuned), a.rank, a.clamp_quantile, targets=a.targets)
    out = write_lora(weights, a.out, a.to, pipe=base, overwrite=a.overwrite)
    print(f"extracted {len(weights)} modules at rank {a.rank}; wrote {out} ({_size(out)})")
    print(f"  relative error ||dW - BA|| / ||dW||: max {report.max_error:.3g}, mean {report.mean_error:.3g}")


COMMANDS = {
    "train": cmd_train,
    "generate": cmd_generate,
    "inspect": cmd_inspect,
    "convert": cmd_convert,
    "merge": cmd_merge,
    "mix": cmd_mix,
    "extract": cmd_extract,
    "embed": cmd_embed,
    "int-merge": cmd_int_merge,
    "quantize": cmd_quantize,
    "eval": cmd_eval,
    "bench": cmd_bench,
}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # before transformers is imported by a command
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    quiet_libraries()
    command = {"lora": getattr(args, "lora_command", None), "intlora": "int-merge", "qlora": "int-merge"}.get(
        args.command, args.command
    )
    try:
        COMMANDS[command](args)
    except QuantuneError as e:
        for cause in cause_chain(e):  # -v: what lies behind the one line
            logger.debug("caused by", exc_info=(type(cause), cause, cause.__traceback__))
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the system refused a read or write (permissions, a full disk, a busy mount point)
        logger.debug("caused by", exc_info=(type(e), e, e.__traceback__))
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}: check the path, its permissions and the free space", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no partial output was kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
