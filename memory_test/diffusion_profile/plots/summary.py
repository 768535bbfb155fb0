"""summary.md: one section per setting (every run, its spread and ratios, max batch, chart links), K and scaling
sections, the files that were skipped. Runs whose step times spread widely are marked noisy, and CPU sections say
that their ratios are not meaningful."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from memory_test.diffusion_profile.plots.style import CPU_CAVEAT, byte_unit, is_cpu, title
from memory_test.diffusion_profile.plots.tables import markdown_table
from memory_test.records.record import NOISY_SPREAD

NOISY = "noisy"
NOISY_NOTE = (
    f"`{NOISY}`: the run's step times spread more than {NOISY_SPREAD}× between their 20th and 80th percentiles "
    f"(p80/p20), or, for `time × vanilla`, vanilla's did: its median, and a ratio of medians, move with that noise."
)


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return ""
    return format(v, spec)


def _marked(value, spec: str, noisy: bool) -> str:
    text = _fmt(value, spec)
    return f"{text} {NOISY}" if text and noisy else text


def runs_table(df: pd.DataFrame) -> pd.DataFrame:
    scale, unit = byte_unit(float(df["total_bytes"].max(skipna=True) or 1))
    noisy = df["noisy"].eq(True) if "noisy" in df else pd.Series(False, index=df.index)
    ratio_noisy = df["time_x_vanilla_noisy"].eq(True) if "time_x_vanilla_noisy" in df else noisy
    return pd.DataFrame(
        {
            "experiment": df["experiment"],
            "batch": df["batch_size"],
            "status": df["status"].str.upper().where(df["status"] != "ok", "ok"),
            f"peak ({unit})": [_fmt(v / scale if v is not None else None, ".2f") for v in df["total_bytes"]],
            f"reserved ({unit})": [
                _fmt(v / scale if v is not None else None, ".2f") for v in df["peak_reserved_bytes"]
            ],
            "median step (ms)": [_fmt(v, ".1f") for v in df["median_ms"]],
            "p80/p20": [_marked(v, ".2f", n) for v, n in zip(df["spread"], noisy)],
            "samples/s": [_fmt(v, ".1f") for v in df["samples_per_s"]],
            "mem × vanilla": [_fmt(v, ".2f") for v in df["mem_x_vanilla"]],
            "time × vanilla": [_marked(v, ".2f", n) for v, n in zip(df["time_x_vanilla"], ratio_noisy)],
            "time × fastest vanilla": [_fmt(v, ".2f") for v in df.get("time_x_fastest_vanilla", df["time_x_vanilla"])],
            "attention": df["attention_backend"].fillna(""),
            "kernels": df["kernel_backend"].fillna(""),
        }
    )


def setting_section(df: pd.DataFrame, mb: pd.DataFrame, setting: dict, charts: list[Path]) -> str:
    lines = [f"## {title(setting)}", ""]
    if is_cpu(setting):
        lines += [f"{CPU_CAVEAT}.", ""]
    if not df.empty:
        lines += [markdown_table(runs_table(df)), ""]
        if df["noisy"].eq(True).any() or df.get("time_x_vanilla_noisy", pd.Series(dtype=bool)).eq(True).any():
            lines += [NOISY_NOTE, ""]
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


def head(count: int, results: Path) -> list[str]:
    lines = [
        "# DiT DP-SGD profiling summary",
        "",
        f"{count} record(s) from `{results}`. Peak = torch allocator peak after warm-up on GPU (process RSS growth "
        "on CPU); step time = median of the measured steps. `× vanilla`: ratio to vanilla at the same setting and "
        f"batch size. `p80/p20`: how far the measured steps spread; above {NOISY_SPREAD} a run is marked `{NOISY}`.",
        "",
    ]
    return lines + (["No valid records found.", ""] if not count else [])


def skipped_section(skipped: list[str]) -> list[str]:
    return ["## Skipped files", ""] + [f"- {s}" for s in skipped] + [""] if skipped else []
