"""The README's zoo:emoji grid: one row per prompt, 6 fixed seeds, shown at 64 px (nearest) beside the OpenMoji
glyph of the same name. Writes docs/emoji_grid.png, and per prompt how many of the 6 samples the OpenMoji network
recognises as that glyph (top-1 / top-5, quantune.eval.recognition) to benchmarks/results/emoji_grid.{csv,md}.

    python benchmarks/emoji_grid.py [--guidance 4] [--steps 25] [--model zoo:emoji] [--out PNG] [--name emoji_grid]
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch
from PIL import Image
from report import write_report

PROMPTS = [
    "cat face",
    "red apple",
    "rocket",
    "grinning face",
    "green heart",
    "pile of poo",
    "snowman",
    "sun with face",
]


def main() -> None:
    from quantune.data import openmoji_dataset
    from quantune.eval.recognition import glyph_names, glyph_ranks
    from quantune.families import family_of
    from quantune.io import make_grid, save_png
    from quantune.models import load_pipeline

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--model", default="zoo:emoji", help="zoo:emoji or a trained pipeline folder")
    p.add_argument("--out", default="docs/emoji_grid.png")
    p.add_argument("--results", default="benchmarks/results", help="where the recognition table goes")
    p.add_argument("--name", default="emoji_grid", help="the recognition table's file name")
    a = p.parse_args()
    pipe = load_pipeline(a.model)
    glyphs = openmoji_dataset(size=32, subset=PROMPTS)
    reference = {glyphs.captions[i]: glyphs[i]["image"] for i in range(len(glyphs))}
    rows, recognised = [], []
    family = family_of(pipe)  # guidance as the family spells it (zoo:emoji-dit: FLUX's true CFG)
    size = family.default_size(pipe)
    for prompt in PROMPTS:
        gens = [torch.Generator().manual_seed(s) for s in range(6)]
        images = pipe([prompt] * 6, num_inference_steps=a.steps, generator=gens, height=size, width=size,
                      **family.guidance_kwargs(pipe, a.guidance, 6), **family.call_kwargs(pipe)).images  # fmt: skip
        rows.append([reference[prompt]] + [Image.new("RGB", (8, 32), "white")] + images)
        ranks = glyph_ranks(images, [prompt] * len(images))
        first = Counter(glyph_names(images)).most_common(1)[0]
        recognised.append({"prompt": prompt, "top1": sum(r == 1 for r in ranks), "top5": sum(r <= 5 for r in ranks),
                           "n": len(ranks), "ranks": " ".join(map(str, ranks)),
                           "first_choice": f"{first[0]} ({first[1]}/{len(ranks)})"})  # fmt: skip
    grid = make_grid([[im.resize((im.width * 2, 64), Image.NEAREST) for im in row] for row in rows])
    save_png(grid, Path(a.out))
    title = (f"Samples of {a.model} recognised by the OpenMoji network as their prompt's glyph (6 seeds, guidance "
             f"{a.guidance}, {a.steps} sampler steps)")  # fmt: skip
    columns = {"prompt": "{prompt}", "top-1": "{top1}/{n}", "top-5": "{top5}/{n}", "ranks": "{ranks}",
               "network's most frequent first choice": "{first_choice}"}  # fmt: skip
    write_report(recognised, a.results, a.name, title, columns)
    print(f"wrote {a.out}: rows {PROMPTS}; first column the OpenMoji glyph, then 6 samples (guidance {a.guidance})")


if __name__ == "__main__":
    main()
