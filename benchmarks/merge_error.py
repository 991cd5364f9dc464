"""How much of the trained update survives the merge into an integer model, per run of intlora_quality.py.

For each adapted layer: W_train = the weight the training forward used (QLoRA: dequantized base + LoRA delta;
IntLoRA: the MUL / SHIFT weight W'), W_merged = the merged integer layer's weight, W_base = the weight at step 0
(QLoRA: the dequantized base; IntLoRA: W' with B = 0). Reported: |W_merged - W_train| / |W_train - W_base| over all
adapted layers, i.e. the merge error relative to the size of the trained update (0 = the update is kept exactly).

    python benchmarks/merge_error.py [--work outputs/intlora_quality]   (after benchmarks/intlora_quality.py)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from report import write_report


@torch.no_grad()
def merge_error(run_dir: Path) -> tuple[str, float]:
    from quantune.lora.inject import lora_layers
    from quantune.quant.merge_run import load_run
    from quantune.train.quant_methods import intlora_layers, requantize

    family = "qlora" if "qlora" in run_dir.parent.name else "intlora"
    cfg, pipe, _ = load_run(run_dir, family)
    err = upd = 0.0
    if family == "qlora":
        for layer in lora_layers(pipe.unet).values():
            base = layer.base_layer
            w_base = base.dequantize()
            w_train = w_base + layer.get_delta_weight()
            w_merged = requantize(layer, cfg.quant.search).dequantize()
            err += float((w_merged - w_train).pow(2).sum())
            upd += float((w_train - w_base).pow(2).sum())
    else:
        for layer in intlora_layers(pipe.unet).values():
            w_train = layer.adapted_weight()
            w_merged = layer.merge().dequantize().reshape(w_train.shape)
            b = layer.lora_B.detach().clone()
            layer.lora_B.zero_()
            w_base = layer.adapted_weight()
            layer.lora_B.copy_(b)
            err += float((w_merged - w_train).pow(2).sum())
            upd += float((w_train - w_base).pow(2).sum())
    return cfg.method, (err / upd) ** 0.5


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--work", default="outputs/intlora_quality")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    rows = []
    for run_dir in sorted(Path(a.work).glob("*/*/adapter_state.safetensors")):
        method, rel = merge_error(run_dir.parent)
        bits = run_dir.parent.parent.name.split("_")[1].upper()
        rows.append(
            {
                "run": f"{run_dir.parent.parent.name}/{run_dir.parent.name}",
                "method": method,
                "bits": bits,
                "relative_merge_error": rel,
            }
        )
        print(rows[-1], flush=True)
    title = "Merge error relative to the trained update, |W_merged - W_train| / |W_train - W_base|, DreamBooth runs"
    columns = {
        "run": "{run}",
        "method": "{method}",
        "weights": "{bits}",
        "merge error / update": "{relative_merge_error:.4f}",
    }
    write_report(rows, a.out, "merge_error", title, columns)


if __name__ == "__main__":
    main()
