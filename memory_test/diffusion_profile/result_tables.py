"""Records -> pandas tables for the visualizer: one row per run or search, ratios to vanilla, max batch, markdown.

Never imports torch (the visualizer must run where only pandas and matplotlib are installed).
"""

from __future__ import annotations

import sys

import pandas as pd

from memory_test.profiling.records import device_label

PARTS = (
    "weights",
    "gradients",
    "optimizer_state",
    "dp_state",
    "activations_and_other",
)  # memory breakdown parts, bottom to top
SETTING_KEYS = ("device", "model", "image_size", "precision", "noise_multiplicity", "attention")


# ----- the fields the tables read, and their types -------------------------------------------------------------

NUMBER = (int, float)
# (path, accepted types, required). A schema-valid record can still hold a wrongly typed field (a hand-edited file,
# another tool's output): the visualizer skips such a record with a warning naming the field, and draws the rest.
RECORD_FIELDS: tuple[tuple[tuple[str, ...], tuple[type, ...], bool], ...] = (
    (("env",), (dict,), True),
    (("env", "device_type"), (str,), False),
    (("env", "gpu_name"), (str,), False),
    (("env", "gpu_total_memory_bytes"), NUMBER, False),
    (("env", "utc_time"), (str,), False),
    (("config", "model"), (str,), True),
    (("config", "image_size"), (int,), True),
    (("config", "precision"), (str,), True),
    (("config", "noise_multiplicity"), (int,), False),
    (("config", "use_flash_attention"), (bool,), False),
    (("config", "world_size"), (int,), False),
    (("config", "private"), (bool,), False),
    (("config", "mode"), (dict,), False),
    (("config", "mode", "norm"), (str,), False),
    (("config", "mode", "strategy"), (str,), False),
    (("message",), (str,), False),
    (("memory",), (dict,), False),
    (("memory", "total_bytes"), NUMBER, False),
    (("memory", "peak_allocated_bytes"), NUMBER, False),
    (("memory", "peak_reserved_bytes"), NUMBER, False),
    (("memory", "sampled_peak_bytes"), NUMBER, False),
    (("memory", "breakdown"), (dict,), False),
    (("memory", "breakdown", "parts_bytes"), (dict,), False),
    (("timing",), (dict,), False),
    (("timing", "median_ms"), NUMBER, False),
    (("timing", "p20_ms"), NUMBER, False),
    (("timing", "p80_ms"), NUMBER, False),
    (("timing", "samples_per_s"), NUMBER, False),
    (("backends",), (dict,), False),
    (("backends", "attention"), (str,), False),
    (("backends", "kernel_backend"), (str,), False),
    (("privacy",), (dict,), False),
    (("privacy", "epsilon"), NUMBER, False),
    (("distributed",), (dict,), False),
    (("distributed", "peak_bytes_max"), NUMBER, False),
    (("max_batch",), (dict,), False),
    (("max_batch", "max_batch_size"), (int,), False),
    (("max_batch", "first_oom_batch_size"), (int,), False),
    (("max_batch", "limit_reached"), (bool,), False),
)


TYPE_NAMES = {NUMBER: "a number", (dict,): "an object", (str,): "a string", (int,): "an integer", (bool,): "true/false"}


def _has_type(value, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:  # True is an int to Python, not a byte count
        return False
    return isinstance(value, types)


def field_problems(rec: dict) -> list[str]:
    """Fields the tables read that are missing (if required) or of the wrong type: "timing.median_ms is 'fast' ..."."""
    problems = []
    for path, types, required in RECORD_FIELDS:
        parent = _get(rec, *path[:-1]) if len(path) > 1 else rec
        if not isinstance(parent, dict):  # an absent optional block, or a parent already reported
            continue
        value, name = parent.get(path[-1]), ".".join(path)
        if value is None:
            if required:
                problems.append(f"{name} is missing")
        elif not _has_type(value, types):
            problems.append(f"{name} is {value!r:.40} ({type(value).__name__}), expected {TYPE_NAMES[types]}")
    parts = _get(rec, "memory", "breakdown", "parts_bytes")
    for part, value in parts.items() if isinstance(parts, dict) else ():
        if value is not None and not _has_type(value, NUMBER):
            problems.append(f"memory.breakdown.parts_bytes.{part} is {value!r:.40}, expected a number")
    return problems


# ----- records -> tables --------------------------------------------------------------------------------------


def _get(d, *path, default=None):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return default
        d = d[key]
    return d


def run_device(r: dict) -> str:
    """Hardware label, plus " x<N> FSDP2" for a run over N processes (never mixed with single-GPU runs)."""
    world = (r.get("config") or {}).get("world_size") or 1
    return device_label(r) + (f" x{world} FSDP2" if world > 1 else "")


def scaling_family(r: dict) -> str | None:
    """What a run computes, whatever the number of processes: "vanilla", or an engine mode's norms and gradient
    strategy (ghost_fsdp_bk and bookkeeping are one family); None for runs that are not compared across GPUs."""
    cfg = r.get("config") or {}
    mode = cfg.get("mode")
    if mode:
        return f"{mode['norm']} norms, {mode['strategy']}"
    return "vanilla" if r.get("experiment") == "vanilla" else None


def record_row(r: dict) -> tuple[str, dict]:
    """("run" or "max_batch", the table row of one record)."""
    cfg = r["config"]
    row = {
        "device": run_device(r),
        "hardware": device_label(r),
        "world_size": cfg.get("world_size") or 1,
        "scaling_family": scaling_family(r),
        "model": cfg.get("model"),
        "image_size": cfg.get("image_size"),
        "precision": cfg.get("precision"),
        "noise_multiplicity": cfg.get("noise_multiplicity", 1),
        "attention": "flash" if cfg.get("use_flash_attention", True) else "no-flash",
        "experiment": r["experiment"],
        "private": cfg.get("private", r["experiment"] != "vanilla"),
        "batch_size": cfg.get("batch_size"),
        "status": r["status"],
        "message": r.get("message"),
        "utc_time": _get(r, "env", "utc_time", default=""),
        "path": r.get("_path"),
    }
    if r["record_type"] == "max_batch":
        row["max_batch_size"] = _get(r, "max_batch", "max_batch_size")
        row["first_oom_batch_size"] = _get(r, "max_batch", "first_oom_batch_size")
        row["limit_reached"] = _get(r, "max_batch", "limit_reached")
        return "max_batch", row
    mem, timing = r.get("memory") or {}, r.get("timing") or {}
    parts = _get(mem, "breakdown", "parts_bytes", default={}) or {}
    row.update(
        total_bytes=mem.get("total_bytes"),
        peak_allocated_bytes=mem.get("peak_allocated_bytes"),
        peak_reserved_bytes=mem.get("peak_reserved_bytes"),
        sampled_peak_bytes=mem.get("sampled_peak_bytes"),
        median_ms=timing.get("median_ms"),
        p20_ms=timing.get("p20_ms"),
        p80_ms=timing.get("p80_ms"),
        samples_per_s=timing.get("samples_per_s"),
        attention_backend=_get(r, "backends", "attention"),
        kernel_backend=_get(r, "backends", "kernel_backend"),
        epsilon=_get(r, "privacy", "epsilon"),
        peak_bytes_max=_get(r, "distributed", "peak_bytes_max", default=mem.get("total_bytes")),
    )
    for p in PARTS:
        row[p] = parts.get(p)
    return "run", row


def drawable_records(recs: list[dict], warn) -> list[dict]:
    """The records whose fields the tables can read; ``warn`` is told each other one's file and field."""
    keep = []
    for r in recs:
        problems = field_problems(r)
        if not problems:
            try:
                record_row(r)
            except (TypeError, AttributeError, KeyError, ValueError) as e:  # a shape field_problems does not know
                problems = [f"cannot read its fields ({type(e).__name__}: {e})"]
        if problems:
            warn(f"skipping {r.get('_path', 'a record of ' + str(r.get('experiment')))}: {'; '.join(problems[:3])}")
            continue
        keep.append(r)
    return keep


def records_to_frames(recs: list[dict], warn=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, max_batch) tables, one row per record; the latest record wins for a repeated configuration.

    A record with a missing or wrongly typed field is left out, and ``warn`` is told its file and the field.
    """
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    rows: dict[str, list[dict]] = {"run": [], "max_batch": []}
    for r in drawable_records(recs, warn):
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
    """Columns mem_x_vanilla and time_x_vanilla: this run divided by vanilla at the same setting and batch size."""
    if runs.empty:
        return runs
    ok = runs[(runs["status"] == "ok") & (runs["experiment"] == "vanilla")]
    ref = ok.set_index([*SETTING_KEYS, "batch_size"])[["total_bytes", "median_ms"]]
    ref = ref.rename(columns={"total_bytes": "_v_mem", "median_ms": "_v_ms"})
    runs = runs.join(ref, on=[*SETTING_KEYS, "batch_size"])
    good = runs["status"] == "ok"
    runs["mem_x_vanilla"] = (runs["total_bytes"] / runs["_v_mem"]).where(good)
    runs["time_x_vanilla"] = (runs["median_ms"] / runs["_v_ms"]).where(good)
    return runs.drop(columns=["_v_mem", "_v_ms"])


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


def _select(frame: pd.DataFrame, setting: dict) -> pd.DataFrame:
    if frame.empty:
        return frame
    keys = list(SETTING_KEYS)
    return frame[(frame[keys] == pd.Series({k: setting[k] for k in keys})).all(axis=1)]
