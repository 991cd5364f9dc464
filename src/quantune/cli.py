"""The `quantune` command line: parses, calls the library, prints. No logic of its own.

Every QuantuneError is printed as one line `error: ...` with exit status 2; nothing half-written is left behind
(the library writes atomically).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from quantune import cli_lora
from quantune.allocator import keep_freed_memory
from quantune.cli_args import add_out, count, load_model, number, size_of
from quantune.errors import QuantuneError, cause_chain
from quantune.logs import quiet_libraries

logger = logging.getLogger("quantune")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="quantune", description="Fine-tune and compress diffusion models.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_train(sub)
    cli_lora.add_lora(sub)
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
    g.add_argument("--steps", type=count(1), default=20)
    g.add_argument("--seed", type=count(0), default=0)
    g.add_argument("--size", type=count(8), default=None, help="image side in px (default: the model's)")
    g.add_argument("--num-images", type=count(1), default=1)
    g.add_argument("--guidance", type=number, default=7.5)
    g.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="auto: fp16 on cuda")
    _add_backend(g)
    add_out(g)


def _add_backend(p) -> None:
    why = "an integer model's engine: auto is OpenVINO on the CPU when installed, else PyTorch's kernels"
    p.add_argument("--backend", default="auto", choices=["auto", "openvino", "torch"], help=why)


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="train a LoRA or the full UNet from a TOML config")
    t.add_argument("config", nargs="?", help="a TOML file (configs/ has examples); defaults apply without one")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (dotted)")
    t.add_argument("--resume", help="latest, or a checkpoint folder name (step-000100)")
    add_out(t, "output_dir (a previous run there)")


def _add_quantize(sub) -> None:
    q = sub.add_parser("quantize", help="post-training quantization of the denoiser into an integer model")
    q.add_argument("--model", required=True, help="zoo:emoji, a diffusers folder, or a hub id")
    q.add_argument("--method", default="eda-dm", help="eda-dm, qdiffusion, minmax (ptq/methods: any registered)")
    q.add_argument("--wbits", type=count(1), default=8, help="weight bits: 2..8 (8: symmetric int8)")
    q.add_argument("--abits", type=_bits_or_none, default=8, help="activation bits, or none for weight-only")
    q.add_argument("--attn-bits", type=_bits_or_none, default=8, help="q/k/v/softmax bits, or none (float)")
    q.add_argument("--smooth", type=number, help="SmoothQuant's alpha in [0, 1] (0.5: the paper's); default off")
    q.add_argument("--calib-samples", type=count(1), default=256, help="calibration trajectories N")
    q.add_argument("--steps", type=count(1), default=20, help="sampler steps of the calibration trajectories")
    q.add_argument("--iters", type=count(0), default=1000, help="reconstruction iterations per block")
    q.add_argument("--batch-size", type=count(1), default=32)
    q.add_argument("--keep-fp", action="append", default=[], help="layer name or regex left in float (repeatable)")
    q.add_argument("--prompts", help="calibration prompts, one per line (default: OpenMoji captions)")
    q.add_argument("--resolution", type=count(8), help="calibration image size in px (default: the model's)")
    q.add_argument("--lr-w", type=number, help="AdaRound learning rate (default by bits, docs/quantization.md)")
    q.add_argument("--lr-a", type=number, default=1e-3, help="activation step-size learning rate (relative)")
    q.add_argument("--tdac-r", type=number, default=0.3, help="TDAC radius: 0.3 LSUN / COCO, 3.0 CIFAR / ImageNet")
    q.add_argument("--tdac-lambda", type=number, default=5.0, help="TDAC variety weight: 5 COCO, 1 LSUN, 1.2 CIFAR")
    q.add_argument("--add-loss", type=number, default=0.8, help="FBR's inner-layer weight (eda-dm)")
    q.add_argument("--qdrop", type=number, default=0.5, help="QDrop probability (eda-dm)")
    q.add_argument("--round-reg", type=number, default=0.01, help="AdaRound regulariser weight (0: EDA-DM's ref.)")
    q.add_argument("--guidance", type=number, help="calibration sampler's guidance (default: the pipeline's own)")
    q.add_argument("--seed", type=count(0), default=0)
    add_out(q)


def _add_eval(sub) -> None:
    ev = sub.add_parser(
        "eval", help="generate for a prompt set and score: FID, glyph, CLIP-T/I, DINO, PSNR, SSIM, LPIPS"
    )
    ev.add_argument("--model", required=True)
    ev.add_argument("--lora", action="append", default=[], help="FILE[:SCALE] (repeatable)")
    ev.add_argument("--prompts", default="builtin", help="builtin (OpenMoji captions) or a file, one per line")
    ev.add_argument("--metrics", default="fid", help="comma-separated: fid,glyph,clip-t,clip-i,dino,lpips,psnr,ssim")
    ev.add_argument("--n", type=count(0), default=64, help="number of prompts (builtin: drawn with the seed; 0: all)")
    ev.add_argument("--steps", type=count(1), default=20)
    ev.add_argument("--guidance", type=number, default=7.5)
    ev.add_argument("--size", type=count(8), help="image side in px (default: the model's)")
    ev.add_argument("--seed", type=count(0), default=0, help="image i uses seed + i")
    ev.add_argument("--reference", help="folder of real images for FID (builtin prompts: their glyphs)")
    ev.add_argument("--instance", help="folder of subject images for clip-i / dino")
    ev.add_argument("--compare-model", help="model whose same-seed samples psnr / ssim / lpips compare against")
    ev.add_argument("--feature", default="openmoji", help="FID features: openmoji or a local CLIP folder")
    ev.add_argument("--clip", help="local CLIPModel folder (clip-t, clip-i)")
    ev.add_argument("--dino", help="local DINO / DINOv2 folder")
    ev.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1, ...")
    _add_backend(ev)
    add_out(ev)


def _add_bench(sub) -> None:
    b = sub.add_parser("bench", help="the benchmark tables vs the peers (one process per table) and the report")
    b.add_argument("--quick", action="store_true", help="small settings: under 15 minutes on a 2-core CPU")
    b.add_argument("--only", help="comma-separated tables (default: all): training,dit_training,files,inference,...")
    b.add_argument("--report-only", action="store_true", help="rewrite the report from the tables already in --out")
    b.add_argument("--readme", help="then write the report into this README's marked results section")
    b.add_argument("--link", help="the --out folder as the README links it (default: relative to the README)")
    add_out(b)


def _add_merges(sub) -> None:
    for family, what in (("intlora", "IntLoRA: integer products / shifts, no PTQ"), ("qlora", "QLoRA + PTQ")):
        fam = sub.add_parser(family, help=f"merge a {family} run into an integer model ({what})")
        fm = fam.add_subparsers(dest=f"{family}_command", required=True).add_parser(
            "merge", help="write a diffusers folder whose UNet holds integer weights"
        )
        fm.add_argument("run_dir", help="the training run's output_dir")
        add_out(fm)
        fm.set_defaults(family=family)


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
    strengths = "as loaded" if scales == [None] else scales
    print(f"wrote {len(paths) - 1} image(s) and {paths[-1]} ({len(scales)} row(s): strengths {strengths}); "
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
            print(f"  {path} ({size_of(path)})")


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
    pipe = load_model(a.model, merged=True)  # a `lora embed` folder: its tuned model
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
        f"{report['fp32_unet_bytes'] / unet_bytes:.2f}x smaller); wrote {out} ({size_of(out)})"
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


def cmd_int_merge(a) -> None:
    from quantune.train.merge_run import merge_run

    out, n = merge_run(a.run_dir, a.out, a.family, a.overwrite)
    print(f"merged {n} {a.family} layers into integers; wrote diffusers folder {out} ({size_of(out)})")


COMMANDS = {
    **cli_lora.COMMANDS,
    "train": cmd_train,
    "generate": cmd_generate,
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
    keep_freed_memory()  # training and generation reuse freed blocks instead of faulting pages in again
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
