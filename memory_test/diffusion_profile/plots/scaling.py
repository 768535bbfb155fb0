"""Multi-GPU scaling: throughput and per-GPU memory against the number of processes (never imports torch).

Drawn by ``draw``. A sharded run (FSDP2, N processes) and a single-process run compute the same
thing when their ``scaling_family`` matches (vanilla with vanilla; ghost_fsdp_bk with bookkeeping: same norms, same
gradient strategy). Wherever records of one GPU type, model, image size, precision, K, attention and per-GPU batch
cover two or more world sizes, this draws one chart and a table: global samples/s, speed-up over one GPU, the
largest rank's peak, and the per-GPU bytes of weights + gradients + optimizer state (≈ 1/N when sharding works).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from memory_test.diffusion_profile.plots.style import byte_unit, finish, setting_text
from memory_test.diffusion_profile.plots.tables import groups_where_varies, markdown_table, with_setting_defaults

GROUP_KEYS = (
    "hardware",
    "model",
    "image_size",
    "precision",
    "noise_multiplicity",
    "attention",
    "compile",
    "batch_size",
)
STATE_PARTS = ("weights", "gradients", "optimizer_state")


def scaling_groups(runs: pd.DataFrame) -> list[tuple[dict, pd.DataFrame]]:
    """(group, its ok runs with a scaling family) for every group whose runs span two or more world sizes."""
    if runs.empty or "scaling_family" not in runs:
        return []
    ok = with_setting_defaults(runs[(runs["status"] == "ok") & runs["scaling_family"].notna()])
    return groups_where_varies(ok, GROUP_KEYS, "scaling_family", "world_size")


def scaling_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per family and world size: samples/s, speed-up and memory against the same family on one GPU."""
    t = df[["scaling_family", "experiment", "world_size", "samples_per_s", "peak_bytes_max"]].copy()
    t["state_bytes_per_gpu"] = df[list(STATE_PARTS)].sum(axis=1, min_count=len(STATE_PARTS))
    one = t[t["world_size"] == 1].set_index("scaling_family")
    t["speedup_vs_1"] = t["samples_per_s"] / t["scaling_family"].map(one["samples_per_s"])
    t["state_x_1gpu"] = t["state_bytes_per_gpu"] / t["scaling_family"].map(one["state_bytes_per_gpu"])
    return t.sort_values(["scaling_family", "world_size"]).reset_index(drop=True)


def _unit(t: pd.DataFrame) -> tuple[float, str]:
    return byte_unit(float(t["peak_bytes_max"].max(skipna=True) or 0))


def _title(group: dict) -> str:
    return f"{setting_text(group)}, B={group['batch_size']} per GPU on {group['hardware']}"


def plot_scaling(df: pd.DataFrame, group: dict, out: Path) -> Path:
    t = scaling_table(df)
    scale, unit = _unit(t)
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.8))
    cmap = plt.get_cmap("tab10")
    for i, (fam, rows) in enumerate(t.groupby("scaling_family", sort=True)):
        c = cmap(i % 10)
        label = f"{fam} ({', '.join(dict.fromkeys(rows['experiment']))})"
        ax1.plot(rows["world_size"], rows["samples_per_s"], "o-", color=c, label=label)
        ax2.plot(rows["world_size"], rows["speedup_vs_1"], "o-", color=c, label=fam)
        ax3.plot(rows["world_size"], rows["peak_bytes_max"] / scale, "o-", color=c, label=f"{fam}: peak (largest rank)")
        ax3.plot(rows["world_size"], rows["state_bytes_per_gpu"] / scale, "s--", color=c, label=f"{fam}: W+G+opt")
    worlds = sorted(t["world_size"].unique())
    ax2.plot(worlds, worlds, "k--", lw=1, label="linear")
    for ax, ylabel in (
        (ax1, "global samples/s"),
        (ax2, "speed-up over 1 GPU"),
        (ax3, f"per-GPU {unit}"),
    ):
        ax.set_xticks(worlds)
        ax.set_xlabel("GPUs (processes)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    title = "Multi-GPU scaling (FSDP2, same per-GPU batch)\n" + _title(group)
    return finish(fig, out, title, setting={"device": group["hardware"]})


def scaling_section(df: pd.DataFrame, group: dict, chart: Path) -> str:
    t = scaling_table(df)
    scale, unit = _unit(t)
    view = pd.DataFrame(
        {
            "family": t["scaling_family"],
            "experiment": t["experiment"],
            "GPUs": t["world_size"],
            "samples/s": t["samples_per_s"].round(1),
            "× 1 GPU": t["speedup_vs_1"].round(2),
            f"peak, largest rank ({unit})": (t["peak_bytes_max"] / scale).round(2),
            f"W+G+opt per GPU ({unit})": (t["state_bytes_per_gpu"] / scale).round(2),
            "W+G+opt × 1 GPU": t["state_x_1gpu"].round(2),
        }
    )
    return "\n".join(
        [f"## Scaling: {_title(group)}", "", markdown_table(view), "", f"Chart: [{chart.name}]({chart.name})", ""]
    )
