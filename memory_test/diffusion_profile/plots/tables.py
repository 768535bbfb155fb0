"""Records -> pandas tables for the charts: one row per run or search, ratios to vanilla, max batch, markdown.

Reads typed records (``memory_test.records``): a record whose fields have the wrong type never gets here (the
loader skips it, naming the file and the field). Never imports torch (the visualizer must run where only pandas
and matplotlib are installed).
"""

from __future__ import annotations

import pandas as pd

from memory_test.records.record import Record

# Records that differ in any of these are never drawn in one chart.
SETTING_KEYS = ("device", "model", "image_size", "precision", "noise_multiplicity", "attention", "compile")
# The same setting whatever torch.compile did: "the fastest vanilla" is looked for across these.
SETTING_KEYS_ANY_COMPILE = tuple(k for k in SETTING_KEYS if k != "compile")
# A setting key a table or setting may lack: it predates the key, so it has the value every older record had.
SETTING_DEFAULTS = {"compile": "off"}


def with_setting_defaults(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with every SETTING_DEFAULTS column present (tables built before the key existed)."""
    missing = {k: v for k, v in SETTING_DEFAULTS.items() if k not in frame}
    return frame.assign(**missing) if missing else frame


def scaling_family(r: Record) -> str | None:
    """What a run computes, whatever the number of processes: "vanilla", or an engine mode's norms and gradient
    strategy (ghost_fsdp_bk and bookkeeping are one family); None for runs that are not compared across GPUs."""
    mode = r.config.mode
    if mode:
        return f"{mode['norm']} norms, {mode['strategy']}"
    return "vanilla" if r.experiment == "vanilla" else None


def record_row(r: Record) -> tuple[str, dict]:
    """("run" or "max_batch", the table row of one record)."""
    cfg = r.config
    row = {
        "device": r.device,
        "hardware": r.env.device_label,
        "world_size": cfg.world_size,
        "scaling_family": scaling_family(r),
        "model": cfg.model,
        "image_size": cfg.image_size,
        "precision": cfg.precision,
        "noise_multiplicity": cfg.noise_multiplicity,
        "attention": cfg.attention,
        "compile": cfg.compile,
        "experiment": r.experiment,
        "private": cfg.private,
        "batch_size": cfg.batch_size,
        "status": r.status,
        "message": r.message,
        "utc_time": r.env.utc_time or "",
        "path": r.path,
    }
    if r.record_type == "max_batch":
        mb = r.max_batch
        row["max_batch_size"] = mb.max_batch_size if mb else None
        row["first_oom_batch_size"] = mb.first_oom_batch_size if mb else None
        row["limit_reached"] = mb.limit_reached if mb else None
        return "max_batch", row
    return "run", {**row, **_measured(r)}


def _measured(r: Record) -> dict:
    mem, timing = r.memory, r.timing
    breakdown = mem.breakdown if mem else None
    row = {
        "total_bytes": mem.total_bytes if mem else None,
        "peak_allocated_bytes": mem.peak_allocated_bytes if mem else None,
        "peak_reserved_bytes": mem.peak_reserved_bytes if mem else None,
        "sampled_peak_bytes": mem.sampled_peak_bytes if mem else None,
        "median_ms": timing.median_ms if timing else None,
        "p20_ms": timing.p20_ms if timing else None,
        "p80_ms": timing.p80_ms if timing else None,
        "spread": timing.spread if timing else None,
        "noisy": bool(timing and timing.noisy),
        "samples_per_s": timing.samples_per_s if timing else None,
        "attention_backend": r.backends.attention if r.backends else None,
        "kernel_backend": r.backends.kernel_backend if r.backends else None,
        "epsilon": r.privacy.epsilon if r.privacy else None,
        "peak_bytes_max": r.distributed.peak_bytes_max
        if r.distributed and r.distributed.peak_bytes_max is not None
        else (mem.total_bytes if mem else None),
        "stacked_parts": breakdown.stacked_bytes if breakdown and breakdown.total_bytes is not None else None,
        "overlapping_parts": breakdown.overlapping_bytes if breakdown else None,
    }
    parts = breakdown.parts_bytes if breakdown else {}
    return {**row, **parts}


def records_to_frames(recs: list[Record]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, max_batch) tables, one row per record; the latest record wins for a repeated configuration."""
    rows: dict[str, list[dict]] = {"run": [], "max_batch": []}
    for r in recs:
        kind, row = record_row(r)
        rows[kind].append(row)
    runs, maxb = rows["run"], rows["max_batch"]
    cols = [*SETTING_KEYS, "experiment", "batch_size"]
    out = []
    for rows in (runs, maxb):
        df = pd.DataFrame(rows)
        if not df.empty:
            df = df.sort_values("utc_time").drop_duplicates(subset=cols, keep="last")
            df = df.sort_values([*SETTING_KEYS, "experiment", "batch_size"], kind="stable").reset_index(drop=True)
        out.append(df)
    runs_df, max_df = out
    if not max_df.empty:  # one search per experiment and setting (its batch_size column is the result)
        max_df = max_df.sort_values("utc_time").drop_duplicates(subset=[*SETTING_KEYS, "experiment"], keep="last")
    return runs_df, max_df


def groups_where_varies(ok: pd.DataFrame, keys, series: str, varying: str) -> list[tuple[dict, pd.DataFrame]]:
    """(group, rows) per group of ``keys``, keeping the ``series`` whose rows span two or more ``varying`` values."""
    out = []
    for values, df in ok.groupby(list(keys), sort=True):
        df = df[df.groupby(series)[varying].transform("nunique") >= 2]
        if not df.empty:
            out.append((dict(zip(keys, values)), df))
    return out


def add_vanilla_ratios(runs: pd.DataFrame) -> pd.DataFrame:
    """Columns mem_x_vanilla and time_x_vanilla: this run divided by vanilla at the same setting and batch size;
    time_x_vanilla_noisy: either run's step times spread widely (``Timing.noisy``)."""
    if runs.empty:
        return runs
    runs = with_setting_defaults(runs)
    runs = runs.assign(noisy=runs["noisy"].eq(True) if "noisy" in runs else False)
    ok = runs[(runs["status"] == "ok") & (runs["experiment"] == "vanilla")]
    ref = ok.set_index([*SETTING_KEYS, "batch_size"])[["total_bytes", "median_ms", "noisy"]]
    ref = ref.rename(columns={"total_bytes": "_v_mem", "median_ms": "_v_ms", "noisy": "_v_noisy"})
    runs = runs.join(ref, on=[*SETTING_KEYS, "batch_size"])
    good = runs["status"] == "ok"
    runs["mem_x_vanilla"] = (runs["total_bytes"] / runs["_v_mem"]).where(good)
    runs["time_x_vanilla"] = (runs["median_ms"] / runs["_v_ms"]).where(good)
    # a ratio of two medians is as noisy as the noisier of the two
    runs["time_x_vanilla_noisy"] = good & runs["time_x_vanilla"].notna() & (runs["noisy"] | runs["_v_noisy"].eq(True))
    # against the fastest vanilla at this batch, eager or compiled: what a user would otherwise run
    fastest = ok.groupby([*SETTING_KEYS_ANY_COMPILE, "batch_size"], dropna=False)["median_ms"].min().rename("_f_ms")
    runs = runs.join(fastest, on=[*SETTING_KEYS_ANY_COMPILE, "batch_size"])
    runs["time_x_fastest_vanilla"] = (runs["median_ms"] / runs["_f_ms"]).where(good)
    return runs.drop(columns=["_v_mem", "_v_ms", "_v_noisy", "_f_ms"])


def max_batch_table(runs: pd.DataFrame, maxb: pd.DataFrame) -> pd.DataFrame:
    """Per experiment: the searched max batch if a search record exists, else the largest ok batch of the grid.

    ``first_oom`` is the smallest batch seen to run out of memory (the search's, else the grid's): the true maximum
    lies in [max_batch, first_oom).
    """
    rows = {}
    grid_oom: dict[str, int] = {}
    for _, r in runs.iterrows() if not runs.empty else []:
        if r["status"] == "oom":
            grid_oom[r["experiment"]] = min(grid_oom.get(r["experiment"], r["batch_size"]), r["batch_size"])
        if r["status"] != "ok":
            continue
        cur = rows.get(r["experiment"])
        if cur is None or r["batch_size"] > cur["max_batch"]:
            rows[r["experiment"]] = {"experiment": r["experiment"], "max_batch": r["batch_size"], "source": "grid"}
    for exp, row in rows.items():
        row["first_oom"] = grid_oom.get(exp)
    for _, r in maxb.iterrows() if not maxb.empty else []:
        first_oom = None if pd.isna(r.get("first_oom_batch_size")) else int(r["first_oom_batch_size"])
        if r["status"] == "ok" and not pd.isna(r.get("max_batch_size")):
            src = "search (limit reached)" if r.get("limit_reached") else "search"
            rows[r["experiment"]] = {
                "experiment": r["experiment"],
                "max_batch": int(r["max_batch_size"]),
                "first_oom": first_oom,
                "source": src,
            }
        elif r["status"] == "oom":
            rows[r["experiment"]] = {
                "experiment": r["experiment"],
                "max_batch": 0,
                "first_oom": first_oom,
                "source": "search: OOM at start",
            }
    table = pd.DataFrame(list(rows.values()), columns=["experiment", "max_batch", "first_oom", "source"])
    table["first_oom"] = table["first_oom"].astype("Int64")  # integers with gaps, not floats
    return table


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub markdown table (no `tabulate` dependency)."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        cells = ["" if v is None or v is pd.NA or (isinstance(v, float) and pd.isna(v)) else str(v) for v in row]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


def select(frame: pd.DataFrame, setting: dict) -> pd.DataFrame:
    """The rows of one setting (SETTING_KEYS)."""
    if frame.empty:
        return frame
    frame, keys = with_setting_defaults(frame), list(SETTING_KEYS)
    wanted = pd.Series({k: setting[k] if k in setting else SETTING_DEFAULTS[k] for k in keys})
    return frame[(frame[keys] == wanted).all(axis=1)]
