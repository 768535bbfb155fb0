"""Memory breakdown at the peak: one panel per batch size in a grid that fits a screen, one bar per experiment.

Each bar stacks the record's disjoint parts (weights, gradients, optimizer state, the experiment's own additive
state, and the derived remainder); parts that share storage with the remainder (the engine's caches: partly the
very activations autograd saves) are drawn as a hatched bar beside it, never stacked, so nothing is counted twice
and no segment is negative. A batch where no experiment ran is a note under the grid, not an empty panel.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from memory_test.diffusion_profile.plots.style import (
    CPU_CAVEAT,
    MAX_WIDTH_IN,
    PART_LABELS,
    byte_unit,
    experiment_order,
    finish,
    is_cpu,
    part_color,
    title,
)

MAX_COLUMNS = 3
MIN_WIDTH_IN = 8.5  # room for a two-column legend under a single panel
LEGEND_COLUMN_IN = 4.1  # the longest legend label at fontsize 8, with its patch
OVERLAP_LABEL = "engine caches at their peak (they overlap activations: not stacked)"


def panels_and_notes(df: pd.DataFrame) -> tuple[list, list[str]]:
    """The batch sizes that get a panel (some experiment ran there) and the notes under the grid."""
    batches = sorted(df["batch_size"].unique())
    drawn = [b for b in batches if (df[df["batch_size"] == b]["status"] == "ok").any()]
    return drawn, _notes(df, batches, drawn)


def plot_breakdown(df: pd.DataFrame, setting: dict, out: Path) -> Path | None:
    drawn, notes = panels_and_notes(df)
    if not drawn:
        return None
    exps, parts = experiment_order(df), _part_names(df)
    scale, unit = byte_unit(float(pd.concat([df["total_bytes"], df["peak_reserved_bytes"]]).max(skipna=True) or 1))
    handles = _legend(parts, df)
    notes += [CPU_CAVEAT] if is_cpu(setting) else []
    rows = math.ceil(len(drawn) / MAX_COLUMNS)
    cols = math.ceil(len(drawn) / rows)  # 4 panels: 2 x 2, not 3 + 1
    width = min(MAX_WIDTH_IN, max(MIN_WIDTH_IN, cols * max(4.0, 0.7 * len(exps) + 1.6)))
    ncol = max(1, min(3, int(width // LEGEND_COLUMN_IN)))  # as many legend columns as fit the width
    legend_in, notes_in = 0.24 * math.ceil(len(handles) / ncol) + 0.1, 0.2 * len(notes) + 0.1
    fig, axes = plt.subplots(rows, cols, figsize=(width, 3.9 * rows + 0.6 + legend_in + notes_in), squeeze=False)
    for ax, b in zip(axes.flat, drawn):
        _panel(ax, df[df["batch_size"] == b].set_index("experiment"), exps, parts, scale)
        ax.set_title(f"batch {b}", fontsize=10)
        ax.set_ylabel(f"memory ({unit})")
    for ax in list(axes.flat)[len(drawn) :]:
        ax.set_visible(False)
    fig.suptitle("Memory breakdown at the peak (stacked parts add up to the peak)\n" + title(setting), fontsize=10)
    height = fig.get_figheight()
    for i, note in enumerate(reversed(notes)):
        fig.text(0.5, (0.05 + 0.2 * i) / height, note, ha="center", va="bottom", fontsize=8, color="dimgrey")
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, notes_in / height))  # fmt: skip
    fig.tight_layout(rect=(0, (notes_in + legend_in) / height, 1, 1 - 0.55 / height))
    return finish(fig, out, layout=False)


def _part_names(df: pd.DataFrame) -> list[str]:
    """Stacked parts bottom to top, as the records name them (the first record that has them decides the order);
    a part that is zero in every run (no additive DP state here) is left out of the legend."""
    names: list[str] = []
    for parts in df["stacked_parts"].dropna():
        names += [p for p, v in parts.items() if p not in names and v]
    return names


def _panel(ax, sub: pd.DataFrame, exps: list[str], parts: list[str], scale: float) -> None:
    for x, e in enumerate(exps):
        if e not in sub.index:
            continue
        r = sub.loc[e]
        if r["status"] != "ok" or pd.isna(r["total_bytes"]):
            ax.text(x, 0, r["status"].upper(), ha="center", va="bottom", rotation=90, color="crimson", fontsize=9)
            continue
        bottom = 0.0
        for i, part in enumerate(parts):
            v = max((r["stacked_parts"] or {}).get(part) or 0, 0) / scale  # < 0 only for a sampled CPU peak
            if v > 0:
                ax.bar(x - 0.1, v, bottom=bottom, color=part_color(part, i), width=0.6)
                bottom += v
        for part, v in (r["overlapping_parts"] or {}).items():
            if v:
                ax.bar(x + 0.3, v / scale, width=0.2, color="none", edgecolor=part_color(part, 3), hatch="////")
        peak = r["total_bytes"] / scale
        ax.plot([x - 0.45, x + 0.25], [peak, peak], color="black", lw=2)
        if not pd.isna(r["peak_reserved_bytes"]):
            ax.plot(x - 0.1, r["peak_reserved_bytes"] / scale, marker="_", ms=18, color="grey")
    ax.set_xticks(range(len(exps)), exps, rotation=40, ha="right", fontsize=8)
    ax.set_xlim(-0.7, len(exps) - 0.3)


def _legend(parts: list[str], df: pd.DataFrame) -> list:
    handles = [Patch(color=part_color(p, i), label=PART_LABELS.get(p, p)) for i, p in enumerate(parts)]
    if any(bool(v) for o in df["overlapping_parts"].dropna() for v in o.values()):
        handles.append(Patch(facecolor="none", edgecolor=part_color("dp_state", 3), hatch="////", label=OVERLAP_LABEL))
    handles.append(Line2D([], [], color="black", lw=2, label="peak (GPU: allocator; CPU: RSS growth)"))
    if df["peak_reserved_bytes"].notna().any():
        handles.append(Line2D([], [], color="grey", marker="_", ms=12, ls="", label="peak reserved"))
    return handles


def _notes(df: pd.DataFrame, batches: list, drawn: list) -> list[str]:
    """One line per batch with no panel (what happened to each experiment there); a word on clipped remainders."""
    notes = []
    stacks = df[df["status"] == "ok"]["stacked_parts"].dropna()
    if any(min(parts.values(), default=0) < 0 for parts in stacks):
        notes.append("a remainder below zero (a sampled CPU peak smaller than the measured parts) is drawn as zero")
    for b in batches:
        if b in drawn:
            continue
        by_status: dict[str, list[str]] = {}
        for _, r in df[df["batch_size"] == b].iterrows():
            by_status.setdefault(r["status"], []).append(r["experiment"])
        what = "; ".join(f"{s.upper()}: {', '.join(sorted(e))}" for s, e in sorted(by_status.items()))
        notes.append(f"batch {b}: no experiment ran ({what})")
    return notes
