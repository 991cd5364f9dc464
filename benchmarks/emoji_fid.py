"""FID of zoo:emoji (and, for scale, of zoo:tiny's random weights) against the OpenMoji images, with quantune's
OpenMoji feature network (quantune.eval.fid), and how many samples that network recognises as the glyph their
caption names (quantune.eval.glyph_recognition, top-1 / top-5). Prompts are the captions of N glyphs drawn at random
(the held-out unicorn excluded); the reference set is those glyphs' images, whose own recognition is the ceiling
row. Writes CSV + Markdown.

    python benchmarks/emoji_fid.py [--n 500] [--steps 25] [--models zoo:emoji,zoo:tiny] [--out benchmarks/results]
                                   [--name emoji_fid]
"""

from __future__ import annotations

import argparse
import time

import torch
from report import write_report


def main() -> None:
    from quantune.data import openmoji_dataset
    from quantune.eval import fid, glyph_recognition
    from quantune.eval.run import EvalConfig, sample_images
    from quantune.models import load_pipeline

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--models", default="zoo:emoji,zoo:tiny", help="comma-separated: zoo names or pipeline folders")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default="emoji_fid", help="the result files' name")
    a = p.parse_args()
    data = openmoji_dataset(size=32, subset="^(?!.*unicorn)")
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[: a.n].tolist()
    prompts = [data.captions[i] for i in pick]
    reference = [data[i]["image"] for i in pick]
    other = torch.randperm(len(data), generator=torch.Generator().manual_seed(1))[: a.n].tolist()
    rows = [
        {
            "model": "OpenMoji itself (another draw of N glyphs)",
            "fid": fid([data[i]["image"] for i in other], reference),
            **glyph_recognition(reference, prompts),  # the glyphs under their own names: the ceiling
            "seconds": 0.0,
        }
    ]
    for ref in a.models.split(","):
        start = time.time()
        pipe = load_pipeline(ref)  # image i from seed i; guidance as the family spells it (FLUX: true CFG)
        images = sample_images(pipe, prompts, EvalConfig(steps=a.steps, guidance_scale=a.guidance, batch=50))
        seconds = time.time() - start
        rows.append({"model": ref, "fid": fid(images, reference), **glyph_recognition(images, prompts),
                     "seconds": seconds})  # fmt: skip
    title = (
        f"FID against {a.n} OpenMoji images (OpenMoji feature network, 32 px), {a.steps} sampler steps, "
        f"guidance {a.guidance}"
    )
    columns = {"model": "{model}", "FID": "{fid:.2f}", "glyph top-1": "{glyph_top1:.3f}",
               "glyph top-5": "{glyph_top5:.3f}", "generation time (s)": "{seconds:.0f}"}  # fmt: skip
    write_report(rows, a.out, a.name, title, columns)


if __name__ == "__main__":
    main()
