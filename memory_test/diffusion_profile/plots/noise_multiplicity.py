"""How each mode's step time and memory grow with the noise multiplicity K (never imports torch).

Drawn by ``draw``: wherever records of one device, model, image size, precision, attention, compile setting and
batch size cover at least two values of K, it draws one chart and a markdown table across K.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from memory_test.diffusion_profile.plots.style import finish, setting_text
from memory_test.diffusion_profile.plots.tables import groups_where_varies, markdown_table, with_setting_defaults

# compile too: an eager and a compiled run are two lines, never one (nor a K=1 baseline with two values)
GROUP_KEYS = ("device", "model", "image_size", "precision", "attention", "compile", "batch_size")


def k_groups(runs: pd.DataFrame) -> list[tuple[dict, pd.DataFrame]]:
    """(group, its ok runs) for every group of GROUP_KEYS whose ok runs span two or more values of K.

    Experiments measured at a single K in that group are left out of it.
    """
    if runs.empty:
        return []
    ok = with_setting_defaults(runs[runs["status"] == "ok"])
    return groups_where_varies(ok, GROUP_KEYS, "experiment", "noise_multiplicity")


def _title(group: dict) -> str:
    return f"{setting_text(group)}, B={group['batch_size']} images on {group['device']}"


def k_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per experiment and K: median step, × vanilla at the same K, × its own K=1 time, peak memory."""
    t = df[["experiment", "noise_multiplicity", "median_ms", "time_x_vanilla", "total_bytes"]].copy()
    base = t[t["noise_multiplicity"] == 1].set_index("experiment")["median_ms"]
    t["x_own_k1"] = t["median_ms"] / t["experiment"].map(base)
    return t.sort_values(["experiment", "noise_multiplicity"]).reset_index(drop=True)


def plot_k(df: pd.DataFrame, group: dict, out: Path, colors: dict) -> Path:
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.8))
    table = k_table(df)
    for e, rows in table.groupby("experiment", sort=False):
        c = colors.get(e)
        ax1.plot(rows["noise_multiplicity"], rows["median_ms"], "o-", label=e, color=c)
        if e != "vanilla":
            ax2.plot(rows["noise_multiplicity"], rows["time_x_vanilla"], "o-", label=e, color=c)
        ax3.plot(rows["noise_multiplicity"], rows["total_bytes"] / 2**30, "o-", label=e, color=c)
    for ax, ylabel in ((ax1, "median step time (ms)"), (ax2, "step time / vanilla at the same K"), (ax3, "peak (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("noise multiplicity K (noise draws per image)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    ax1.set_yscale("log")
    ax2.axhline(1.0, color="k", ls="--", lw=1)
    title = "Cost of noise multiplicity K (K×T rows per sample for the norms)\n" + _title(group)
    return finish(fig, out, title, setting=group)


def k_section(df: pd.DataFrame, group: dict, chart: Path) -> str:
    t = k_table(df)
    view = pd.DataFrame(
        {
            "experiment": t["experiment"],
            "K": t["noise_multiplicity"],
            "median step (ms)": t["median_ms"].round(1),
            "× vanilla (same K)": t["time_x_vanilla"].round(2),
            "× own K=1": t["x_own_k1"].round(2),
            "peak (GiB)": (t["total_bytes"] / 2**30).round(2),
        }
    )
    lines = [
        f"## Noise multiplicity: {_title(group)}",
        "",
        markdown_table(view),
        "",
        f"Chart: [{chart.name}]({chart.name})",
        "",
    ]
    return "\n".join(lines)
