"""The largest batch each experiment fits: a search's result, or the largest ok batch of the grid (a lower bound)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from memory_test.diffusion_profile.plots.style import experiment_order, finish, title


def plot_max_batch(table: pd.DataFrame, setting: dict, out: Path) -> Path | None:
    if table.empty:
        return None
    exps = [e for e in experiment_order(table) if e in set(table["experiment"])]
    t = table.set_index("experiment").loc[exps]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(exps) + 2), 4.5))
    for x, (_, r) in enumerate(t.iterrows()):
        grid = r["source"] == "grid"
        ax.bar(x, r["max_batch"], color="#bbbbbb" if grid else "#4c72b0", hatch="//" if grid else None)
        label = f"{r['max_batch']}{'+' if grid else ''}"
        if not pd.isna(r["first_oom"]):
            label += f"\n(OOM {r['first_oom']})"
        ax.text(x, r["max_batch"], label, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(exps)), exps, rotation=45, ha="right")
    ax.set_ylabel("max batch size")
    ax.margins(y=0.15)
    ax.set_title(
        "Largest batch that fits; (OOM n): smallest batch that ran out of memory\n"
        "hatched: no search, largest ok batch of the grid (a lower bound) | " + title(setting),
        fontsize=9,
    )
    fig.tight_layout()
    return finish(fig, out, setting=setting)
