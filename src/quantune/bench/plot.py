"""A table's figure as a PNG (matplotlib, headless Agg backend): one panel of horizontal bars per plotted value,
one bar per row, the rows labelled alike in every panel. Rows without a value (a peer that did not run) get no
bar."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path


def bar_chart(table, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = table.plot
    labels = [table.cell(spec.label, r) for r in table.rows]
    panels = list(spec.values.items())
    fig, axes = plt.subplots(1, len(panels), sharey=True, squeeze=False,
                             figsize=(3.2 + 3.2 * len(panels), 0.8 + 0.26 * len(labels)))  # fmt: skip
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, (ax, (xlabel, key)) in enumerate(zip(axes[0], panels)):
        xs = [_number(r.get(key)) for r in table.rows]
        ys = [i for i, x in enumerate(xs) if not math.isnan(x)]
        ax.barh(ys, [xs[i] for i in ys], color=colors[j % len(colors)])
        for i, x in enumerate(xs):
            if math.isnan(x):  # at the axis' left edge (a log axis has no 0)
                ax.annotate("n/a", (0, i), xycoords=("axes fraction", "data"), xytext=(3, 0),
                            textcoords="offset points", va="center", fontsize=7)  # fmt: skip
            else:
                ax.annotate(f"{x:.3g}", (x, i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.margins(x=0.18)
        if spec.log:
            ax.set_xscale("log")
    axes[0][0].set_yticks(range(len(labels)), labels, fontsize=7)
    axes[0][0].invert_yaxis()
    width = fig.get_size_inches()[0]
    fig.suptitle(textwrap.fill(table.title, width=int(width * 15)), fontsize=9)  # wrapped to the figure's width
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _number(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")
