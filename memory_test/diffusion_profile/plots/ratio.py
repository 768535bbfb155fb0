"""Each DP mode's peak memory and median step time divided by vanilla's at the same batch size.

A step-time ratio is drawn hollow when the steps of that mode or of vanilla spread widely (p80/p20 above
``NOISY_SPREAD``): the ratio of two medians then moves with the noise, not with the mode.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from memory_test.diffusion_profile.plots.style import colors, experiment_order, finish, title
from memory_test.records.record import NOISY_SPREAD


def plot_ratio(df: pd.DataFrame, setting: dict, out: Path) -> Path | None:
    dp = df[(df["experiment"] != "vanilla") & df["mem_x_vanilla"].notna()]
    if dp.empty:
        return None
    exps = experiment_order(dp)
    color = colors(experiment_order(df))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    for e in exps:
        sub = dp[dp["experiment"] == e].sort_values("batch_size")
        ax1.plot(sub["batch_size"], sub["mem_x_vanilla"], marker="o", color=color[e], label=e)
        ax2.plot(sub["batch_size"], sub["time_x_vanilla"], marker="o", color=color[e], label=e)
        noisy = sub[sub["time_x_vanilla_noisy"]]
        ax2.plot(noisy["batch_size"], noisy["time_x_vanilla"], "o", mfc="white", mec=color[e], ms=8, ls="")
    for ax, what in ((ax1, "peak memory"), (ax2, "median step time")):
        ax.axhline(1.0, color="black", lw=1, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(f"{what} / vanilla")
        ax.legend(fontsize=8)
    if dp["time_x_vanilla_noisy"].any():
        ax2.set_title(f"hollow: noisy (its or vanilla's step times spread, p80/p20 > {NOISY_SPREAD})", fontsize=8)
    fig.suptitle("Each DP mode relative to vanilla at the same batch size\n" + title(setting), fontsize=10)
    fig.tight_layout()
    return finish(fig, out, setting=setting)
