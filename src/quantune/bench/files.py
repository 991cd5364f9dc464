"""Table 2, files: bytes on disk of LoRA adapters per format, rank and dtype, and of UNets per bit width, each
written by quantune and by the tool a user would pick instead.

Adapters (LoRA on diffusers' attention targets): quantune writes its own format, diffusers
(`pytorch_lora_weights.safetensors`), peft (`adapter_model.safetensors` + config) and kohya; the peers' own files
are written by diffusers (`StableDiffusionPipeline.save_lora_weights` of peft's state dict, as
train_text_to_image_lora.py does) and peft (`PeftModel.save_pretrained`).
UNets: fp32 / fp16 safetensors (diffusers' save_pretrained), quantune's integer folders (W8A8, W4A8, W4A16: int8 /
packed int4 codes + scales, what `quantune quantize` writes), torchao (int8 weight-only, `torch.save` of the state
dict, its documented route), optimum-quanto (qint8 / qint4 weights, `safe_save`) and bitsandbytes NF4
(safetensors of the state dict, as diffusers saves it).

Sizes do not depend on what ran before, so the rows are built in the table's own process (no child per row).

    python -m quantune.bench.files [--quick] --out DIR
"""

from __future__ import annotations

import gc
import json
import logging
import tempfile
from pathlib import Path

import torch

from quantune.bench.common import Plot, Table, table_main
from quantune.bench.models import TARGETS, build
from quantune.formats.inspect import disk_size

logger = logging.getLogger(__name__)
ADAPTER_FORMATS = ["quantune", "diffusers", "peft", "kohya", "diffusers (peer)", "peft (peer)"]


def adapter_row(model: str, rank: int, dtype: str) -> dict:
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from quantune.formats import write_lora
    from quantune.lora import LoraConfig as QLoraConfig
    from quantune.lora import add_lora
    from quantune.lora.weights import get_lora_weights

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    bm = build(model)
    row = {"model": model, "rank": rank, "dtype": dtype}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        add_lora(bm.unet, QLoraConfig(r=rank, alpha=float(rank), targets=TARGETS, init="gaussian"))
        weights = get_lora_weights(bm.unet)
        for mod in weights.values():
            mod.down, mod.up = mod.down.to(torch_dtype), mod.up.to(torch_dtype)
        row["modules"] = len(weights)
        for fmt in ADAPTER_FORMATS[:4]:
            row[fmt] = disk_size(write_lora(weights, tmp / fmt, fmt))
        bm = build(model)  # a fresh UNet for the peers
        bm.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGETS))
        bm.unet.to(torch_dtype)
        StableDiffusionPipeline.save_lora_weights(tmp / "peer_diffusers",
                                                  unet_lora_layers=get_peft_model_state_dict(bm.unet))  # fmt: skip
        row["diffusers (peer)"] = disk_size(tmp / "peer_diffusers")
        bm = build(model)
        peft_model = get_peft_model(bm.unet, LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS))
        peft_model.to(torch_dtype).save_pretrained(tmp / "peer_peft")
        row["peft (peer)"] = sum(disk_size(f) for f in (tmp / "peer_peft").rglob("adapter_*"))  # not peft's README.md
    return row


def _quantune_unet(bm, wbits: int, abits: int | None, tmp: Path) -> int:
    from quantune.bench.inference import denoiser_kwargs, quantune_int
    from quantune.quant.quantize import write_spec

    quantune_int(bm.unet, [denoiser_kwargs(bm, 1, 8 * bm.latent_factor, seed=s) for s in (1, 2)], wbits, abits)
    bm.unet.save_pretrained(tmp / "unet", safe_serialization=True)
    write_spec(bm.unet, tmp / "unet")
    return disk_size(tmp / "unet")


def model_row(model: str, variant: str) -> dict:
    bm = build(model)
    unet = bm.unet.eval().requires_grad_(False)
    row = {"model": model, "variant": variant, "params": sum(p.numel() for p in unet.parameters())}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        try:
            if variant in ("fp32", "fp16"):
                unet.to(torch.float16 if variant == "fp16" else torch.float32)
                unet.save_pretrained(tmp / "unet", safe_serialization=True)
                row["bytes"] = disk_size(tmp / "unet")
            elif variant.startswith("quantune"):
                bits = variant.split()[1]
                row["bytes"] = _quantune_unet(bm, int(bits[1]), None if bits.endswith("A16") else 8, tmp)
            elif variant.startswith("torchao"):
                from torchao.quantization import Int8WeightOnlyConfig, quantize_

                quantize_(unet, Int8WeightOnlyConfig())
                torch.save(unet.state_dict(), tmp / "unet.pt")
                row["bytes"] = disk_size(tmp / "unet.pt")
            elif variant.startswith("quanto"):
                from optimum.quanto import freeze, qint4, qint8, quantization_map, quantize
                from safetensors.torch import save_file

                quantize(unet, weights=qint8 if "qint8" in variant else qint4)
                freeze(unet)  # quanto's documented serialization: the state dict + its quantization map
                save_file(unet.state_dict(), tmp / "unet.safetensors")
                (tmp / "quanto_qmap.json").write_text(json.dumps(quantization_map(unet)))
                row["bytes"] = disk_size(tmp / "unet.safetensors") + disk_size(tmp / "quanto_qmap.json")
            else:  # bitsandbytes NF4
                from safetensors.torch import save_file

                from quantune.bench.training import _to_bnb_nf4

                _to_bnb_nf4(unet)
                sd = {k: v.contiguous() for k, v in unet.state_dict().items() if isinstance(v, torch.Tensor)}
                save_file(sd, tmp / "unet.safetensors")
                row["bytes"] = disk_size(tmp / "unet.safetensors")
        except ModuleNotFoundError as e:  # a peer that is not installed; any other error is raised
            return {**row, "status": f"not installed ({e.name})"}
    return {**row, "status": "ok", "mb": row["bytes"] / 2**20}


MODEL_VARIANTS = ["fp32", "fp16", "quantune W8A8", "quantune W4A8", "quantune W4A16", "torchao int8 weight-only",
                  "quanto qint8 weights", "quanto qint4 weights", "bnb nf4"]  # fmt: skip


def _logged(row: dict) -> dict:
    gc.collect()  # the UNets built for the row (SD-1.5: 3.4 GB each) go before the next
    logger.info("%s", row)
    return row


def tables(quick: bool) -> list[Table]:
    models = ["zoo:emoji"] if quick else ["zoo:emoji", "sd15"]
    combos = [(m, r, d) for m in ["zoo:emoji", "sd15"] for r in (4, 32) for d in ("fp32", "fp16")]
    if quick:  # an SD-1.5 row costs ~50 s (three UNets built)
        combos = [c for c in combos if c[0] == "zoo:emoji" or c[1:] == (4, "fp16")]
    adapters = [_logged(adapter_row(*c)) for c in combos]  # sizes do not depend on the process: no children
    for r in adapters:
        for fmt in ADAPTER_FORMATS:
            r[fmt.split()[0] + ("_peer_mb" if "peer" in fmt else "_mb")] = r[fmt] / 2**20
    fmt_cols = {f"{f} (MB)": "{" + f.split()[0] + ("_peer_mb" if "peer" in f else "_mb") + ":.3f}"
                for f in ADAPTER_FORMATS}  # fmt: skip
    t1 = Table(
        "files_adapters", f"LoRA adapter files on disk (targets {TARGETS})",
        {"model": "{model}", "rank": "{rank}", "dtype": "{dtype}", "modules": "{modules}", **fmt_cols},
        adapters,
        Plot("{model} r{rank} {dtype}", {f"{f} (MB)": f.split()[0] + ("_peer_mb" if "peer" in f else "_mb")
                                         for f in ("quantune", "diffusers", "diffusers (peer)")}, log=True),
        notes=["'(peer)' columns: the file written by the peer itself (diffusers' save_lora_weights of peft's state "
               "dict, peft's save_pretrained), from a UNet adapted by peft with the same targets and rank"],
    )  # fmt: skip
    rows = []
    for model in models:
        group = [_logged(model_row(model, v)) for v in MODEL_VARIANTS]
        fp32 = group[0]["bytes"]
        for g in group:
            if g.get("status") == "ok":
                g["vs_fp32"] = fp32 / g["bytes"]
        rows += group
    t2 = Table(
        "files_models", "UNet files on disk per bit width: quantune's integer folders vs the peers' saved models",
        {"model": "{model}", "variant": "{variant}", "MB": "{mb:.2f}", "smaller than fp32": "{vs_fp32:.2f}x",
         "status": "{status}"},
        rows,
        Plot("{model} {variant}", {"MB on disk": "mb"}, log=True),
        notes=["sd15 = the SD-1.5 UNet architecture (859.5 M parameters), random weights: sizes are real",
               "torchao and bnb quantize Linear weights only (convs stay float); quanto and quantune quantize Linear "
               "and Conv2d; norms, biases and scales stay float everywhere"],
    )  # fmt: skip
    return [t1, t2]


def main() -> None:
    table_main(__doc__, lambda quick, out: tables(quick))


if __name__ == "__main__":
    main()
