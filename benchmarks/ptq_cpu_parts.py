"""Benchmark: where quantune's integer UNet spends its time on CPU, and the alternatives measured for its parts.

1. Attention at SD-1.5's first level (4096 tokens, 8 heads x 40, batch 2): fp32 / bf16 flash attention
   (F.scaled_dot_product_attention), the materialised fp32 / bf16 product, and one head of an int8 attention
   (torch._int_mm QK^T and PV, softmax, quantizing P).
2. Quantizing an activation (2 x 320 x 64 x 64) to uint8: out-of-place ops, in place after one division, and
   torch.quantize_per_tensor + int_repr.
3. W4A16: PyTorch's int4 weight-only CPU kernel against dense and dequantize-then-matmul (`--parts int4`).
4. torch.profiler of quantune's W8A8 SD-1.5-architecture UNet forward (batch 2) at --res: the top operators.
Medians of --reps; writes CSV + Markdown.

    python benchmarks/ptq_cpu_parts.py [--res 512] [--reps 5] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from report import median_ms, write_report

PARTS = "attention,quantize,int4,profile"


def attention_rows(reps: int) -> list[dict]:
    b, h, n, d = 2, 8, 4096, 40
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()

    def materialised(q, k, v):
        s = torch.bmm(q.reshape(-1, n, d), k.reshape(-1, n, d).transpose(1, 2)) * d**-0.5
        return torch.bmm(s.softmax(-1), v.reshape(-1, n, d))

    qi, ki = torch.randint(-128, 127, (n, d), dtype=torch.int8), torch.randint(-128, 127, (d, n), dtype=torch.int8)
    vi = torch.randint(-128, 127, (n, d), dtype=torch.int8)

    def int8_head():
        s = torch._int_mm(qi, ki).float() * 1e-3
        p = s.softmax(-1)
        p8 = (torch.clamp(torch.round(p * 255), 0, 255) - 128).to(torch.int8)
        return torch._int_mm(p8, vi)

    cases = {
        "flash fp32 (all heads)": lambda: F.scaled_dot_product_attention(q, k, v),
        "flash bf16 (all heads)": lambda: F.scaled_dot_product_attention(qb, kb, vb),
        "materialised fp32 (all heads)": lambda: materialised(q, k, v),
        "materialised bf16 (all heads)": lambda: materialised(qb, kb, vb),
        "int8 _int_mm + softmax + quantize P (one head)": int8_head,
    }
    with torch.inference_mode():
        return [{"part": "attention 4096 tokens", "variant": k, "median_ms": median_ms(f, reps)}
                for k, f in cases.items()]  # fmt: skip


def quantize_rows(reps: int) -> list[dict]:
    x = torch.randn(2, 320, 64, 64, generator=torch.Generator().manual_seed(1))
    s, z = torch.tensor([0.03]), 120

    def in_place():
        q = torch.div(x, s)
        return q.round_().add_(z).clamp_(0, 255).to(torch.uint8)

    cases = {
        "out of place (5 new tensors)": lambda: torch.clamp(torch.round(x / s) + z, 0, 255).to(torch.uint8),
        "one division, then in place (quantune)": in_place,
        "quantize_per_tensor + int_repr": lambda: torch.quantize_per_tensor(x, 0.03, z, torch.quint8).int_repr(),
    }
    with torch.inference_mode():
        return [{"part": "quantize 2x320x64x64", "variant": k, "median_ms": median_ms(f, reps)}
                for k, f in cases.items()]  # fmt: skip


def int4_rows(reps: int) -> list[dict]:
    """W4A16 alternatives for one SD-1.5-sized Linear (1280 -> 640) at M = 256 rows: PyTorch's int4 weight-only CPU
    kernel (_weight_int4pack_mm_for_cpu, per-row scales repeated per group of 128) against a dense matmul and
    against dequantize-then-matmul (what quantune's W4A16 layers do)."""
    n, k, m = 640, 1280, 256
    g = torch.Generator().manual_seed(2)
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=g)
    s, z = torch.rand(n, generator=g) * 0.01 + 1e-3, torch.randint(0, 16, (n,), generator=g)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.stack([s.repeat(k // 128, 1), (s * (8 - z)).repeat(k // 128, 1)], dim=-1)  # w = s (q - z)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        x, w = torch.randn(m, k, generator=g).to(dtype), (s[:, None] * (q - z[:, None])).to(dtype)
        szd = sz.to(dtype)
        cases = {
            "int4pack kernel": lambda x=x, szd=szd: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 128, szd),
            "dense matmul": lambda x=x, w=w: x @ w.t(),
            "dequantize + matmul": lambda x=x, dt=dtype: x @ (s[:, None] * (q - z[:, None])).to(dt).t(),
        }
        with torch.inference_mode():
            rows += [{"part": f"W4A16 Linear 1280->640, M={m}, {dtype}".replace("torch.", ""), "variant": name,
                      "median_ms": median_ms(f, reps)} for name, f in cases.items()]  # fmt: skip
    return rows


def profile_rows(res: int, top: int = 8) -> list[dict]:
    from quantune.bench.inference import quantune_int
    from quantune.bench.models import build

    bm = build("sd15")
    bm.unet.eval().requires_grad_(False)
    args = bm.inputs(2, res)
    model = quantune_int(bm.unet, [bm.inputs(2, res, seed=1)], 8, 8)
    with torch.inference_mode():
        model(*args)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(*args)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / 1000
    rows = [{"part": f"W8A8 UNet forward {res} px", "variant": "total", "median_ms": total}]
    rows += [{"part": f"W8A8 UNet forward {res} px", "variant": f"{e.key} ({e.count} calls)",
              "median_ms": e.self_cpu_time_total / 1000} for e in events[:top]]  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--res", type=int, default=512)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--parts", default=PARTS, help="comma-separated: attention,quantize,int4,profile")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    parts = {"attention": attention_rows, "quantize": quantize_rows, "int4": int4_rows,
             "profile": lambda reps: profile_rows(a.res)}  # fmt: skip
    rows = [r for name in a.parts.split(",") for r in parts[name](a.reps)]
    name = "ptq_cpu_parts" if a.parts == PARTS else "ptq_cpu_parts_" + a.parts.replace(",", "_")
    write_report(rows, a.out, name, "Parts of the integer UNet's CPU time (ms; profile rows: self time)",
                 {"part": "{part}", "variant": "{variant}", "ms": "{median_ms:.1f}"})  # fmt: skip


if __name__ == "__main__":
    main()
