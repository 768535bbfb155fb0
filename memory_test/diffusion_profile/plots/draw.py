"""Every chart and summary.md for a folder of records: one set per setting, plus K and scaling groups."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from memory_test.cli_common.errors import debug_enabled
from memory_test.cli_common.files import atomic_write_text
from memory_test.diffusion_profile.plots import compile_compare as cc
from memory_test.diffusion_profile.plots import noise_multiplicity as nm
from memory_test.diffusion_profile.plots import scaling, summary
from memory_test.diffusion_profile.plots.batch_curves import plot_peak_vs_batch, plot_time_vs_batch, plot_tradeoff
from memory_test.diffusion_profile.plots.breakdown import plot_breakdown
from memory_test.diffusion_profile.plots.max_batch import plot_max_batch
from memory_test.diffusion_profile.plots.ratio import plot_ratio
from memory_test.diffusion_profile.plots.style import colors, experiment_order, slug
from memory_test.diffusion_profile.plots.tables import (
    SETTING_KEYS,
    add_vanilla_ratios,
    max_batch_table,
    records_to_frames,
    select,
)
from memory_test.records.io import load_records
from memory_test.records.record import Record

SETTING_CHARTS = (
    ("breakdown", plot_breakdown),
    ("peak_memory_vs_batch", plot_peak_vs_batch),
    ("time_throughput_vs_batch", plot_time_vs_batch),
    ("memory_time_tradeoff", plot_tradeoff),
    ("ratio_to_vanilla", plot_ratio),
)
CHART_KINDS = (*(name for name, _ in SETTING_CHARTS), "max_batch", "noise_multiplicity", "scaling", "compile")


class Drawing:
    """One visualizer run: the charts written and the warnings given (files skipped, charts not drawn)."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.written: list[Path] = []
        self.skipped: list[str] = []

    def warn(self, msg: str) -> None:
        self.skipped.append(msg)
        print(f"warning: {msg}", file=sys.stderr)

    def chart(self, fn, *args) -> Path | None:
        """One chart; a failure (a record shape nobody anticipated) costs that chart only, with a warning."""
        try:
            path = fn(*args)
        except Exception as e:
            if debug_enabled():
                raise
            plt.close("all")
            target = next(a.name for a in args if isinstance(a, Path))
            self.warn(f"{target} not drawn ({fn.__name__}): {type(e).__name__}: {e}")
            return None
        if path is not None:
            self.written.append(path)
        return path


def remove_old_charts(out_dir: Path) -> None:
    """Charts of an earlier run that this one may not redraw (files that are not the visualizer's stay)."""
    for old in out_dir.glob("*__*.png"):
        if old.name.split("__")[0] in CHART_KINDS:
            old.unlink()


def draw_all(results: Path, out_dir: Path) -> Drawing:
    """Charts and summary.md for every record under ``results``, into ``out_dir`` (created if missing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    drawing = Drawing(out_dir)
    remove_old_charts(out_dir)
    recs = load_records(results, warn=drawing.warn)
    runs, maxb = records_to_frames(recs)
    runs = add_vanilla_ratios(runs)
    sections = [setting_charts(drawing, runs, maxb, setting) for setting in settings(recs, runs, maxb)]
    sections += group_charts(drawing, runs)
    text = summary.head(len(recs), results) + sections + summary.skipped_section(drawing.skipped)
    atomic_write_text(out_dir / "summary.md", "\n".join(text))
    return drawing


def settings(recs: list[Record], runs: pd.DataFrame, maxb: pd.DataFrame) -> list[dict]:
    """Every setting (SETTING_KEYS) that has records, with its device's memory for the peak chart."""
    gpu_memory = {r.device: r.env.gpu_total_memory_bytes for r in recs}
    found = []
    for frame in (runs, maxb):
        if not frame.empty:
            found += [tuple(x) for x in frame[list(SETTING_KEYS)].drop_duplicates().itertuples(index=False)]
    out = []
    for values in sorted(set(found), key=lambda s: tuple(str(x) for x in s)):
        setting = dict(zip(SETTING_KEYS, values))
        setting["_gpu_total_bytes"] = gpu_memory.get(setting["device"])
        out.append(setting)
    return out


def setting_charts(drawing: Drawing, runs: pd.DataFrame, maxb: pd.DataFrame, setting: dict) -> str:
    df, mb_df = select(runs, setting), select(maxb, setting)
    name = slug(setting[k] for k in SETTING_KEYS if not (k == "compile" and setting[k] == "off"))  # eager: old names
    charts = []
    if not df.empty:
        for kind, fn in SETTING_CHARTS:
            charts.append(drawing.chart(fn, df, setting, drawing.out_dir / f"{kind}__{name}.png"))
    table = max_batch_table(df, mb_df)
    if mb_df.empty and table["first_oom"].isna().all():  # no search and nothing ran out: no limit to show
        table = table.iloc[0:0]
    charts.append(drawing.chart(plot_max_batch, table, setting, drawing.out_dir / f"max_batch__{name}.png"))
    return summary.setting_section(df, table, setting, [c for c in charts if c is not None])


def group_slug(group: dict, keys) -> str:
    """A group's file name part; eager groups keep the names they had before compile was a key."""
    return slug(group[k] for k in keys if not (k == "compile" and group[k] == "off"))


def group_charts(drawing: Drawing, runs: pd.DataFrame) -> list[str]:
    sections = []
    for group, df in nm.k_groups(runs):
        out = drawing.out_dir / f"noise_multiplicity__{group_slug(group, nm.GROUP_KEYS)}.png"
        chart = drawing.chart(nm.plot_k, df, group, out, colors(experiment_order(df)))
        if chart is not None:
            sections.append(nm.k_section(df, group, chart))
    for group, df in scaling.scaling_groups(runs):
        out = drawing.out_dir / f"scaling__{group_slug(group, scaling.GROUP_KEYS)}.png"
        chart = drawing.chart(scaling.plot_scaling, df, group, out)
        if chart is not None:
            sections.append(scaling.scaling_section(df, group, chart))
    for group, df in cc.compile_groups(runs):
        out = drawing.out_dir / f"compile__{group_slug(group, cc.GROUP_KEYS)}.png"
        chart = drawing.chart(cc.plot_compile, df, group, out, cc.compile_colors(df))
        if chart is not None:
            sections.append(cc.compile_section(df, group, chart))
    return sections
