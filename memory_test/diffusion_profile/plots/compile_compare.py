"""Eager vs torch.compile: each experiment's median step time under every compile setting, side by side (no torch).

Drawn by ``draw``: wherever records of one device, model, image size, precision, K and attention have ok runs under
at least two compile settings, it draws one chart (a panel per batch size, grouped bars per experiment) and a
markdown table. Every time is also given as a ratio to the fastest vanilla at that batch, eager or compiled: what a
user would otherwise run, so "should I compile my DP run" reads off one number per bar.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.patches import Patch

from memory_test.diffusion_profile.plots.style import (
    CPU_CAVEAT,
    MAX_WIDTH_IN,
    byte_unit,
    colors,
    experiment_order,
    finish,
    is_cpu,
    setting_text,
)
from memory_test.diffusion_profile.plots.summary import NOISY
from memory_test.diffusion_profile.plots.tables import SETTING_KEYS_ANY_COMPILE, markdown_table, with_setting_defaults
from memory_test.records.record import NOISY_SPREAD

# The suite's --compile choices in their order (suite.flags.COMPILE_MODES: plots never import the suite).
COMPILE_MODES = ("off", "default", "max-autotune", "reduce-overhead")
EAGER, EAGER_LABEL = "off", "eager"
GROUP_KEYS = SETTING_KEYS_ANY_COMPILE
NOISY_MARK = "~"
BAR_IN = 0.17  # width of one bar and its rotated label (19 px at 110 dpi)
MIN_WIDTH_IN = 8.5  # room for the title's notes over a single panel
LEGEND_IN = 0.4
CAVEAT_IN = 0.25
RATIO_NOTE = (
    "number over a bar: its step time / the fastest vanilla at that batch, eager or compiled\n"
    f"{NOISY_MARK}: its or that vanilla's step times spread (p80/p20 > {NOISY_SPREAD})"
)


def compile_groups(runs: pd.DataFrame) -> list[tuple[dict, pd.DataFrame]]:
    """(group, all its runs, failed ones too) for every group of GROUP_KEYS where two or more compile settings have
    ok runs. ``runs`` is ``add_vanilla_ratios``'s frame (it needs time_x_fastest_vanilla and noisy)."""
    if runs.empty:
        return []
    runs = with_setting_defaults(runs)
    out = []
    for values, df in runs.groupby(list(GROUP_KEYS), sort=True):
        if df.loc[df["status"] == "ok", "compile"].nunique() >= 2:
            out.append((dict(zip(GROUP_KEYS, values)), df))
    return out


def compile_settings(df: pd.DataFrame) -> list[str]:
    """The compile settings in ``df``: eager first, then COMPILE_MODES' order, then any other mode by name."""
    rank = {c: i for i, c in enumerate(COMPILE_MODES)}
    return sorted(df["compile"].unique(), key=lambda c: (rank.get(c, len(rank)), str(c)))


def compile_colors(df: pd.DataFrame) -> dict:
    """One colour per compile setting, the same in every group (eager is always the first)."""
    return colors(list(dict.fromkeys([*COMPILE_MODES, *compile_settings(df)])))


def compile_label(setting: str) -> str:
    return EAGER_LABEL if setting == EAGER else f"torch.compile ({setting})"


def with_ratio_noise(df: pd.DataFrame) -> pd.DataFrame:
    """Column ratio_noisy: a ratio of two medians is as noisy as the noisier one, this run or the fastest vanilla
    at its batch (``df`` holds one group: every compile setting of one setting)."""
    vanilla = df[(df["status"] == "ok") & (df["experiment"] == "vanilla") & df["median_ms"].notna()]
    fastest = vanilla.loc[vanilla.groupby("batch_size")["median_ms"].idxmin()].set_index("batch_size")["noisy"]
    ref_noisy = df["batch_size"].map(fastest).eq(True)
    return df.assign(ratio_noisy=df["time_x_fastest_vanilla"].notna() & (df["noisy"].eq(True) | ref_noisy))


def _runs(df: pd.DataFrame) -> dict:
    """(experiment, batch size, compile setting) -> that run's row."""
    return {(r["experiment"], r["batch_size"], r["compile"]): r for _, r in df.iterrows()}


def _ratio_text(r) -> str:
    ratio = r["time_x_fastest_vanilla"]
    return "" if pd.isna(ratio) else f"{NOISY_MARK if r['ratio_noisy'] else ''}{ratio:.2f}×"


def _failure(r) -> str | None:
    """What stands where a run's bar would be when it has none ("oom", "error", ...); None for a timed run."""
    if r["status"] != "ok":
        return r["status"]
    return "no timing" if pd.isna(r["median_ms"]) else None


def plot_compile(df: pd.DataFrame, group: dict, out: Path, colors: dict) -> Path:
    df = with_ratio_noise(df)
    batches, settings, runs = sorted(df["batch_size"].unique()), compile_settings(df), _runs(df)
    exps = {b: experiment_order(df[df["batch_size"] == b]) for b in batches}
    caveat_in = CAVEAT_IN if is_cpu(group) else 0.0  # finish writes the CPU caveat along the bottom
    rows, cols, width = _grid(len(batches), len(settings) * max(len(e) for e in exps.values()))
    height = 3.6 * rows + 1.4 + LEGEND_IN + caveat_in
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
    for ax, b in zip(axes.flat, batches):
        _panel(ax, runs, exps[b], b, settings, colors)
    for ax in list(axes.flat)[len(batches) :]:
        ax.set_visible(False)
    fig.suptitle(f"Eager vs torch.compile: median step time\n{setting_text(group)} on {group['device']}\n{RATIO_NOTE}",
                 fontsize=10)  # fmt: skip
    handles = [Patch(color=colors.get(c), label=compile_label(c)) for c in settings]
    fig.legend(handles=handles, loc="lower center", ncol=len(settings), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, caveat_in / height))  # fmt: skip
    fig.tight_layout(rect=(0, (caveat_in + LEGEND_IN) / height, 1, 1))
    return finish(fig, out, setting=group, layout=False)


def _grid(panels: int, bars_per_panel: int) -> tuple[int, int, float]:
    """(rows, columns, figure width in inches): as many panels side by side as fit MAX_WIDTH_IN."""
    panel_in = max(4.5, BAR_IN * bars_per_panel + 1.0)
    rows = math.ceil(panels / max(1, min(panels, int(MAX_WIDTH_IN // panel_in))))
    cols = math.ceil(panels / rows)  # 4 panels: 2 x 2, not 3 + 1
    return rows, cols, min(MAX_WIDTH_IN, max(MIN_WIDTH_IN, cols * panel_in))


def _panel(ax, runs: dict, exps: list[str], batch, settings: list[str], colors: dict) -> None:
    """One batch size: a group of bars per experiment, one bar (or the failure's name) per compile setting."""
    width = 0.8 / len(settings)
    times = [runs[k]["median_ms"] for k in runs if k[1] == batch and _failure(runs[k]) is None]
    for x, e in enumerate(exps):
        for i, c in enumerate(settings):
            r = runs.get((e, batch, c))
            if r is None:
                continue
            pos = x - 0.4 + width * (i + 0.5)
            if (failure := _failure(r)) is not None:
                ax.text(pos, 0, f" {failure}", rotation=90, ha="center", va="bottom", color="crimson", fontsize=7)
                continue
            ax.bar(pos, r["median_ms"], width, color=colors.get(c))
            ax.text(pos, r["median_ms"], f" {_ratio_text(r)}", rotation=90, ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0, 1.4 * max(times, default=1.0))  # room for the labels over the tallest bar
    if not times:  # nothing ran at this batch: no time axis to read
        ax.set_yticks([])
    ax.set_xticks(range(len(exps)), exps, rotation=30, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(exps) - 0.4)
    ax.set_title(f"batch {batch}", fontsize=10)
    ax.set_ylabel("median step time (ms)")


def compile_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per experiment and batch size: per compile setting "ms (× fastest vanilla)" and the peak, and each
    compiled setting's median divided by eager's (same experiment and batch) where both ran."""
    df = with_ratio_noise(df)
    settings, runs, order = compile_settings(df), _runs(df), experiment_order(df)
    compiled = [c for c in settings if c != EAGER] if EAGER in settings else []
    scale, unit = byte_unit(float(df["total_bytes"].max(skipna=True) or 1))
    rows = []
    for e, b in sorted({(e, b) for e, b, _ in runs}, key=lambda k: (order.index(k[0]), k[1])):
        row = {"experiment": e, "batch": b}
        for c in settings:
            r = runs.get((e, b, c))
            peak = None if r is None or _failure(r) else r["total_bytes"]
            row[f"{_short(c)}: ms (× fastest vanilla)"] = "" if r is None else _time_cell(r)
            row[f"{_short(c)}: peak ({unit})"] = "" if peak is None or pd.isna(peak) else f"{peak / scale:.2f}"
        for c in compiled:
            row[f"{c} / eager"] = _speedup_cell(runs.get((e, b, c)), runs.get((e, b, EAGER)))
        rows.append(row)
    return pd.DataFrame(rows)


def _short(setting: str) -> str:
    return EAGER_LABEL if setting == EAGER else setting


def _time_cell(r) -> str:
    if (failure := _failure(r)) is not None:
        return failure
    ratio = r["time_x_fastest_vanilla"]
    noisy = f" {NOISY}" if r["ratio_noisy"] else ""
    return f"{r['median_ms']:.1f}" + ("" if pd.isna(ratio) else f" ({ratio:.2f}×{noisy})")


def _speedup_cell(compiled, eager) -> str:
    if compiled is None or eager is None or _failure(compiled) or _failure(eager):
        return ""
    return f"{compiled['median_ms'] / eager['median_ms']:.2f}"


def compile_section(df: pd.DataFrame, group: dict, chart: Path) -> str:
    lines = [f"## Eager vs torch.compile: {setting_text(group)} on {group['device']}", ""]
    if is_cpu(group):
        lines += [f"{CPU_CAVEAT}.", ""]
    lines += [
        "Per compile setting: median step time in ms, in brackets its ratio to the fastest vanilla at that batch, "
        f"eager or compiled (`{NOISY}`: its or that vanilla's step times spread, p80/p20 > {NOISY_SPREAD}); "
        "`<mode> / eager`: the compiled median over the eager one (below 1: compiling is faster).",
        "",
        markdown_table(compile_table(df)),
        "",
        f"Chart: [{chart.name}]({chart.name})",
        "",
    ]
    return "\n".join(lines)
