"""Curves against the batch size: peak memory, step time and throughput, and the memory-time trade-off."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from memory_test.diffusion_profile.plots.style import byte_unit, colors, experiment_order, finish, title


def _oom_marks(ax, df, exps, colors, xcol="batch_size"):
    top = ax.get_ylim()[1]
    for e in exps:
        bad = df[(df["experiment"] == e) & (df["status"] == "oom")]
        for _, r in bad.iterrows():
            ax.plot(r[xcol], top, marker="x", ms=10, mew=2, color=colors[e], clip_on=False)
            ax.annotate("OOM", (r[xcol], top), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)


def plot_peak_vs_batch(df: pd.DataFrame, setting: dict, out: Path) -> Path:
    exps = experiment_order(df)
    color = colors(exps)
    scale, unit = byte_unit(float(df["total_bytes"].max(skipna=True) or 1))
    fig, ax = plt.subplots(figsize=(7, 5))
    for e in exps:
        ok = df[(df["experiment"] == e) & (df["status"] == "ok")]
        if not ok.empty:
            ax.plot(ok["batch_size"], ok["total_bytes"] / scale, marker="o", color=color[e], label=e)
    for e in exps:  # an experiment with no ok point still gets a legend entry
        if df[(df["experiment"] == e) & (df["status"] == "ok")].empty:
            ax.plot([], [], marker="x", ls="", color=color[e], label=f"{e} (no ok run)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"peak memory ({unit})")
    total = setting.get("_gpu_total_bytes")
    if total:
        ax.axhline(total / scale, color="grey", ls="--", lw=1, label="device memory")
    _oom_marks(ax, df, exps, color)
    ax.legend(fontsize=8)
    ax.set_title("Peak memory vs batch size (x at the top: OOM)\n" + title(setting), fontsize=10)
    fig.tight_layout()
    return finish(fig, out, setting=setting)


def plot_time_vs_batch(df: pd.DataFrame, setting: dict, out: Path) -> Path:
    exps = experiment_order(df)
    color = colors(exps)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    for e in exps:
        ok = df[(df["experiment"] == e) & (df["status"] == "ok")]
        if ok.empty:
            continue
        err = [ok["median_ms"] - ok["p20_ms"], ok["p80_ms"] - ok["median_ms"]]
        ax1.errorbar(ok["batch_size"], ok["median_ms"], yerr=err, marker="o", capsize=3, color=color[e], label=e)
        ax2.plot(ok["batch_size"], ok["samples_per_s"], marker="o", color=color[e], label=e)
    for ax, ylabel in ((ax1, "median step time (ms), p20-p80"), (ax2, "samples / s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        _oom_marks(ax, df, exps, color)
        ax.legend(fontsize=8)
    fig.suptitle("Step time and throughput vs batch size\n" + title(setting), fontsize=10)
    fig.tight_layout()
    return finish(fig, out, setting=setting)


def plot_tradeoff(df: pd.DataFrame, setting: dict, out: Path) -> Path:
    exps = experiment_order(df)
    color = colors(exps)
    scale, unit = byte_unit(float(df["total_bytes"].max(skipna=True) or 1))
    fig, ax = plt.subplots(figsize=(7, 5))
    for e in exps:
        ok = df[(df["experiment"] == e) & (df["status"] == "ok")].sort_values("batch_size")
        if ok.empty:
            continue
        ax.plot(ok["median_ms"], ok["total_bytes"] / scale, marker="o", color=color[e], label=e)
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
    ax.set_title("Memory-time trade-off (lower left is better)\n" + title(setting), fontsize=10)
    fig.tight_layout()
    return finish(fig, out, setting=setting)
