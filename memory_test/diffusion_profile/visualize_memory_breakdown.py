#!/usr/bin/env python3
"""Charts and a summary table from a folder of single_experiment.py records (never imports torch).

    python memory_test/diffusion_profile/visualize_memory_breakdown.py --results-dir results/diffusion_profile

Writes into ``<results-dir>/plots`` (or ``--out-dir``), one set per setting (device, model, image size, precision,
noise multiplicity, attention): memory breakdown bars with the peak marked, peak memory vs batch size, step time and
throughput vs batch size, the memory-time trade-off, max batch per mode, each DP mode's ratio to vanilla; the cost
of noise multiplicity K where records cover several K at one batch size; multi-GPU scaling where they cover several
world sizes; plus ``summary.md``. Records measured on different devices never share a chart. OOM records are drawn
as OOM; corrupt or foreign JSON files are skipped with a warning.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from memory_test.cli_common.errors import ToolArgumentParser, ToolError, debug_enabled, run_tool  # noqa: E402
from memory_test.cli_common.files import atomic_write_text, output_path_problem  # noqa: E402
from memory_test.diffusion_profile import (
    chart_io,  # noqa: E402
    plot_scaling,  # noqa: E402
)
from memory_test.diffusion_profile import plot_noise_multiplicity as nm  # noqa: E402
from memory_test.diffusion_profile.result_tables import (  # noqa: E402  (re-exported for tests and scripts)
    PARTS,
    SETTING_KEYS,
    _select,
    add_vanilla_ratios,
    drawable_records,
    markdown_table,
    max_batch_table,
    records_to_frames,
    run_device,
)
from memory_test.profiling.records import load_records  # noqa: E402

PART_COLORS = {
    "weights": "#4c72b0",
    "gradients": "#55a868",
    "optimizer_state": "#8172b2",
    "dp_state": "#c44e52",
    "activations_and_other": "#ccb974",
}


# ----- formatting ---------------------------------------------------------------------------------------------


def _slug(setting: dict) -> str:
    return chart_io.slug(setting[k] for k in SETTING_KEYS)


def _title(setting: dict) -> str:
    return f"{chart_io.setting_text(setting)} on {setting['device']}"


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return ""
    return format(v, spec)


CHART_KINDS = (
    "breakdown", "peak_memory_vs_batch", "time_throughput_vs_batch", "memory_time_tradeoff", "ratio_to_vanilla",
    "max_batch", "noise_multiplicity", "scaling",
)  # fmt: skip


def _experiment_order(df: pd.DataFrame) -> list[str]:
    names = list(dict.fromkeys(df["experiment"]))
    return sorted(names, key=lambda n: (n != "vanilla", not n.startswith("opacus_"), n))


def _colors(experiments: list[str]) -> dict:
    cmap = plt.get_cmap("tab10")
    return {e: cmap(i % 10) for i, e in enumerate(experiments)}


# ----- charts -------------------------------------------------------------------------------------------------


def plot_breakdown(df: pd.DataFrame, setting: dict, out: Path) -> Path | None:
    batches = sorted(df["batch_size"].unique())[-6:]
    if not batches:
        return None
    exps = _experiment_order(df)
    scale, unit = chart_io.byte_unit(
        float(pd.concat([df["total_bytes"], df["peak_reserved_bytes"]]).max(skipna=True) or 1)
    )
    fig, axes = plt.subplots(1, len(batches), figsize=(max(6, 1.2 * len(exps) * len(batches) + 2), 5), squeeze=False)
    for ax, b in zip(axes[0], batches):
        sub = df[df["batch_size"] == b].set_index("experiment")
        for x, e in enumerate(exps):
            if e not in sub.index:
                continue
            r = sub.loc[e]
            if r["status"] != "ok" or pd.isna(r["total_bytes"]):
                ax.text(x, 0, r["status"].upper(), ha="center", va="bottom", rotation=90, color="crimson", fontsize=9)
                continue
            bottom = 0.0
            for p in PARTS:
                v = r[p]
                if pd.isna(v) or v == 0:
                    continue
                v = v / scale
                ax.bar(x, v, bottom=bottom if v > 0 else 0, color=PART_COLORS[p], width=0.7, label=p)
                bottom += max(v, 0)
            peak = r["total_bytes"] / scale
            ax.plot([x - 0.4, x + 0.4], [peak, peak], color="black", lw=2, label="peak")
            if not pd.isna(r["peak_reserved_bytes"]):
                ax.plot(x, r["peak_reserved_bytes"] / scale, marker="_", ms=22, color="grey", label="peak reserved")
        ax.set_xticks(range(len(exps)), exps, rotation=45, ha="right")
        ax.set_title(f"batch {b}")
        ax.set_ylabel(f"memory ({unit})")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(color=PART_COLORS[p], label=p) for p in reversed(PARTS)]
    handles += [Line2D([], [], color="black", lw=2, label="peak (total)")]
    if df["peak_reserved_bytes"].notna().any():
        handles += [Line2D([], [], color="grey", marker="_", ms=14, ls="", label="peak reserved")]
    fig.legend(handles=handles, loc="upper right", fontsize=8)
    fig.suptitle("Memory breakdown at the peak (activations_and_other = peak - measured parts)\n" + _title(setting))
    fig.tight_layout(rect=(0, 0, 0.85, 0.92))
    return _save(fig, out)


def _oom_marks(ax, df, exps, colors, xcol="batch_size"):
    top = ax.get_ylim()[1]
    for e in exps:
        bad = df[(df["experiment"] == e) & (df["status"] == "oom")]
        for _, r in bad.iterrows():
            ax.plot(r[xcol], top, marker="x", ms=10, mew=2, color=colors[e], clip_on=False)
            ax.annotate("OOM", (r[xcol], top), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)


def plot_peak_vs_batch(df: pd.DataFrame, setting: dict, out: Path) -> Path:
    exps = _experiment_order(df)
    colors = _colors(exps)
    scale, unit = chart_io.byte_unit(float(df["total_bytes"].max(skipna=True) or 1))
    fig, ax = plt.subplots(figsize=(7, 5))
    for e in exps:
        ok = df[(df["experiment"] == e) & (df["status"] == "ok")]
        if not ok.empty:
            ax.plot(ok["batch_size"], ok["total_bytes"] / scale, marker="o", color=colors[e], label=e)
    for e in exps:  # an experiment with no ok point still gets a legend entry
        if df[(df["experiment"] == e) & (df["status"] == "ok")].empty:
            ax.plot([], [], marker="x", ls="", color=colors[e], label=f"{e} (no ok run)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"peak memory ({unit})")
    total = setting.get("_gpu_total_bytes")
    if total:
        ax.axhline(total / scale, color="grey", ls="--", lw=1, label="device memory")
    _oom_marks(ax, df, exps, colors)
    ax.legend(fontsize=8)
    ax.set_title("Peak memory vs batch size (x at the top: OOM)\n" + _title(setting), fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def plot_time_vs_batch(df: pd.DataFrame, setting: dict, out: Path) -> Path:
    exps = _experiment_order(df)
    colors = _colors(exps)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    for e in exps:
        ok = df[(df["experiment"] == e) & (df["status"] == "ok")]
        if ok.empty:
            continue
        err = [ok["median_ms"] - ok["p20_ms"], ok["p80_ms"] - ok["median_ms"]]
        ax1.errorbar(ok["batch_size"], ok["median_ms"], yerr=err, marker="o", capsize=3, color=colors[e], label=e)
        ax2.plot(ok["batch_size"], ok["samples_per_s"], marker="o", color=colors[e], label=e)
    for ax, ylabel in ((ax1, "median step time (ms), p20-p80"), (ax2, "samples / s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        _oom_marks(ax, df, exps, colors)
        ax.legend(fontsize=8)
    fig.suptitle("Step time and throughput vs batch size\n" + _title(setting), fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def plot_tradeoff(df: pd.DataFrame, setting: dict, out: Path) -> Path:
    exps = _experiment_order(df)
    colors = _colors(exps)
    scale, unit = chart_io.byte_unit(float(df["total_bytes"].max(skipna=True) or 1))
    fig, ax = plt.subplots(figsize=(7, 5))
    for e in exps:
        ok = df[(df["experiment"] == e) & (df["status"] == "ok")].sort_values("batch_size")
        if ok.empty:
            continue
        ax.plot(ok["median_ms"], ok["total_bytes"] / scale, marker="o", color=colors[e], label=e)
        for _, r in ok.iterrows():
            ax.annotate(
                f"B={r['batch_size']}",
                (r["median_ms"], r["total_bytes"] / scale),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xlabel("median step time (ms)")
    ax.set_ylabel(f"peak memory ({unit})")
    ax.legend(fontsize=8)
    ax.set_title("Memory-time trade-off (lower left is better)\n" + _title(setting), fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def plot_max_batch(table: pd.DataFrame, setting: dict, out: Path) -> Path | None:
    if table.empty:
        return None
    exps = [e for e in _experiment_order(table) if e in set(table["experiment"])]
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
        "hatched: no search, largest ok batch of the grid (a lower bound) | " + _title(setting),
        fontsize=9,
    )
    fig.tight_layout()
    return _save(fig, out)


def plot_ratio(df: pd.DataFrame, setting: dict, out: Path) -> Path | None:
    dp = df[(df["experiment"] != "vanilla") & df["mem_x_vanilla"].notna()]
    if dp.empty:
        return None
    exps = _experiment_order(dp)
    colors = _colors(_experiment_order(df))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    for e in exps:
        sub = dp[dp["experiment"] == e].sort_values("batch_size")
        ax1.plot(sub["batch_size"], sub["mem_x_vanilla"], marker="o", color=colors[e], label=e)
        ax2.plot(sub["batch_size"], sub["time_x_vanilla"], marker="o", color=colors[e], label=e)
    for ax, what in ((ax1, "peak memory"), (ax2, "median step time")):
        ax.axhline(1.0, color="black", lw=1, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(f"{what} / vanilla")
        ax.legend(fontsize=8)
    fig.suptitle("Each DP mode relative to vanilla at the same batch size\n" + _title(setting), fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def _save(fig, path: Path) -> Path:
    return chart_io.finish(fig, path)


# ----- summary ------------------------------------------------------------------------------------------------


def summary_section(df: pd.DataFrame, mb: pd.DataFrame, setting: dict, charts: list[Path]) -> str:
    scale, unit = chart_io.byte_unit(float(df["total_bytes"].max(skipna=True) or 1)) if not df.empty else (2**20, "MiB")
    lines = [f"## {_title(setting)}", ""]
    if not df.empty:
        t = pd.DataFrame(
            {
                "experiment": df["experiment"],
                "batch": df["batch_size"],
                "status": df["status"].str.upper().where(df["status"] != "ok", "ok"),
                f"peak ({unit})": [_fmt(v / scale if v is not None else None, ".2f") for v in df["total_bytes"]],
                f"reserved ({unit})": [
                    _fmt(v / scale if v is not None else None, ".2f") for v in df["peak_reserved_bytes"]
                ],
                "median step (ms)": [_fmt(v, ".1f") for v in df["median_ms"]],
                "samples/s": [_fmt(v, ".1f") for v in df["samples_per_s"]],
                "mem × vanilla": [_fmt(v, ".2f") for v in df["mem_x_vanilla"]],
                "time × vanilla": [_fmt(v, ".2f") for v in df["time_x_vanilla"]],
                "attention": df["attention_backend"].fillna(""),
                "kernels": df["kernel_backend"].fillna(""),
            }
        )
        lines += [markdown_table(t), ""]
        notes = df[df["status"].isin(["error", "skipped"])]
        for _, r in notes.iterrows():
            lines.append(f"- {r['experiment']} batch {r['batch_size']}: {r['status']}: {str(r['message'])[:300]}")
        if not notes.empty:
            lines.append("")
    if not mb.empty:
        lines += ["Max batch per experiment:", "", markdown_table(mb), ""]
    if charts:
        lines += ["Charts: " + ", ".join(f"[{p.name}]({p.name})" for p in charts), ""]
    return "\n".join(lines)


TOOL = "visualize_memory_breakdown.py"
EXIT_SKIPPED = 3  # charts and summary written, but some files or charts were left out (each named in a warning)
EPILOG = (
    "Exit codes: 0 every record drawn; 3 charts and summary.md written, but some files were skipped (corrupt, "
    "foreign, or a field of the wrong type) or a chart could not be drawn, each named in a warning and in "
    "summary.md; 2 bad input (nothing written); 1 unexpected failure (MEMORY_TEST_DEBUG=1 shows the traceback)."
)


def main(argv: list[str] | None = None) -> int:
    return run_tool(TOOL, lambda: _draw(argv))


def _output_folder(args: argparse.Namespace, results: Path) -> Path:
    """The charts' folder, created if needed; ToolError (before anything is deleted or drawn) if it cannot be."""
    out_dir = Path(args.out_dir) if args.out_dir else results / "plots"
    why = output_path_problem(out_dir / "summary.md")
    if why:
        raise ToolError(f"--out-dir {out_dir}: {why}", "choose a folder you can write (--out-dir)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ToolError(f"--out-dir {out_dir} cannot be created ({e.strerror})", "choose another --out-dir") from None
    return out_dir


def _chart(fn, *args, warn):
    """One chart; a failure (a record shape nobody anticipated) costs that chart only, with a warning."""
    try:
        return fn(*args)
    except Exception as e:
        if debug_enabled():
            raise
        plt.close("all")
        target = next(a.name for a in args if isinstance(a, Path))
        warn(f"{target} not drawn ({fn.__name__}): {type(e).__name__}: {e}")
        return None


def _draw(argv: list[str] | None) -> int:
    ap = ToolArgumentParser(prog=TOOL, description=__doc__.splitlines()[0], epilog=EPILOG)
    ap.add_argument("--results-dir", required=True, help="folder of JSON records (searched recursively)")
    ap.add_argument("--out-dir", default=None, help="where PNGs and summary.md go (default: <results-dir>/plots)")
    args = ap.parse_args(argv)
    results = Path(args.results_dir)
    if not results.is_dir():
        raise ToolError(
            f"--results-dir {results} is not a folder", "give the folder of JSON records (a sweep's --output-dir)"
        )
    out_dir = _output_folder(args, results)
    for old in out_dir.glob("*__*.png"):  # charts of an earlier run that this one may not redraw
        if old.name.split("__")[0] in CHART_KINDS:
            old.unlink()
    skipped: list[str] = []

    def warn(msg: str) -> None:
        skipped.append(msg)
        print(f"warning: {msg}", file=sys.stderr)

    recs = drawable_records(load_records(results, warn=warn), warn)
    runs, maxb = records_to_frames(recs)
    runs = add_vanilla_ratios(runs)
    gpu_mem = {run_device(r): r["env"].get("gpu_total_memory_bytes") for r in recs}
    settings = []
    for frame in (runs, maxb):
        if not frame.empty:
            settings += [tuple(x) for x in frame[list(SETTING_KEYS)].drop_duplicates().itertuples(index=False)]
    settings = sorted(set(settings), key=lambda s: tuple(str(x) for x in s))

    sections, written = [], []
    for values in settings:
        setting = dict(zip(SETTING_KEYS, values))
        df, mb_df = _select(runs, setting), _select(maxb, setting)
        setting["_gpu_total_bytes"] = gpu_mem.get(setting["device"])
        slug = _slug(setting)
        charts = []
        if not df.empty:
            for name, fn in (
                ("breakdown", plot_breakdown),
                ("peak_memory_vs_batch", plot_peak_vs_batch),
                ("time_throughput_vs_batch", plot_time_vs_batch),
                ("memory_time_tradeoff", plot_tradeoff),
                ("ratio_to_vanilla", plot_ratio),
            ):
                p = _chart(fn, df, setting, out_dir / f"{name}__{slug}.png", warn=warn)
                if p is not None:
                    charts.append(p)
        mbt = max_batch_table(df, mb_df)
        if mb_df.empty and mbt["first_oom"].isna().all():  # no search and nothing ran out: no limit to show
            mbt = mbt.iloc[0:0]
        p = _chart(plot_max_batch, mbt, setting, out_dir / f"max_batch__{slug}.png", warn=warn)
        if p is not None:
            charts.append(p)
        written += charts
        sections.append(summary_section(df, mbt, setting, charts))
    for group, df in nm.k_groups(runs):
        slug = chart_io.slug(group[k] for k in nm.GROUP_KEYS)
        colors = _colors(_experiment_order(df))
        chart = _chart(nm.plot_k, df, group, out_dir / f"noise_multiplicity__{slug}.png", colors, warn=warn)
        if chart is not None:
            written.append(chart)
            sections.append(nm.k_section(df, group, chart, markdown_table))
    for group, df in plot_scaling.scaling_groups(runs):
        slug = chart_io.slug(group[k] for k in plot_scaling.GROUP_KEYS)
        chart = _chart(plot_scaling.plot_scaling, df, group, out_dir / f"scaling__{slug}.png", warn=warn)
        if chart is not None:
            written.append(chart)
            sections.append(plot_scaling.scaling_section(df, group, chart, markdown_table))

    head = [
        "# DiT DP-SGD profiling summary",
        "",
        f"{len(recs)} record(s) from `{results}`. Peak = torch allocator peak after warm-up on GPU (process RSS growth "
        "on CPU); step time = median of the measured steps. `× vanilla`: ratio to vanilla at the same setting and "
        "batch size.",
        "",
    ]
    if not recs:
        head += ["No valid records found.", ""]
    tail = ["## Skipped files", ""] + [f"- {s}" for s in skipped] + [""] if skipped else []
    atomic_write_text(out_dir / "summary.md", "\n".join(head + sections + tail))
    print(
        f"wrote {len(written)} chart(s) and {out_dir / 'summary.md'}" + (f"; skipped {len(skipped)}" if skipped else "")
    )
    return EXIT_SKIPPED if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
