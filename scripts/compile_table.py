"""Markdown of a compile_check.py JSON: eager and compiled step times side by side, with the ratios issue 13 asks for.

    python scripts/compile_table.py results/compile_check/h200_xl2_session3.json > results/compile_check/<name>.md

For each precision and batch: vanilla and each DP experiment, eager and compiled (median ms, peak GiB); the DP
experiment's step over compiled vanilla (same compile setting) and over the fastest vanilla at that batch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memory_test.cli_common.errors import ToolError, run_tool  # noqa: E402

NOISY_SPREAD = 1.2  # p80/p20 of the step times above this: the median moves with host noise (marked)


def rows(data: dict) -> dict:
    """(precision, batch, experiment, compiled) -> the timing entry."""
    timed = [r for r in data["time"] if "step_ms_median" in r]
    return {(r["precision"], r["batch_size"], r["experiment"], r["compiled"]): r for r in timed}


def spread(r: dict) -> float:
    t = sorted(r["step_ms_all"])
    return t[int(0.8 * (len(t) - 1))] / t[int(0.2 * (len(t) - 1))]


def ms(r: dict | None) -> str:
    if r is None:
        return "—"
    return f"{r['step_ms_median']:.1f}" + (" noisy" if spread(r) > NOISY_SPREAD else "")


def gib(r: dict | None) -> str:
    return f"{r['peak_allocated_bytes'] / 2**30:.1f}" if r and r.get("peak_allocated_bytes") is not None else "—"


def row(table: dict, precision: str, batch: int, exp: str) -> str:
    eager, comp = table.get((precision, batch, exp, False)), table.get((precision, batch, exp, True))
    v_eager, v_comp = table.get((precision, batch, "vanilla", False)), table.get((precision, batch, "vanilla", True))
    fastest = min((r["step_ms_median"] for r in (v_eager, v_comp) if r), default=None)
    ratio = f"{comp['step_ms_median'] / v_comp['step_ms_median']:.2f}" if comp and v_comp else "—"
    best = f"{comp['step_ms_median'] / fastest:.2f}" if comp and fastest else "—"
    secs = f"{comp['compile_ms'] / 1e3:.1f}" if comp else "—"
    cells = [precision, batch, exp, ms(eager), ms(comp), ratio, best, gib(eager), gib(comp), secs]
    return "| " + " | ".join(map(str, cells)) + " |"


def render(data: dict) -> str:
    table, env, args = rows(data), data["env"], data["args"]
    lines = [
        f"DiT-XL/2, {env['gpu_name']}, torch {env['versions']['torch']}, regional compile ({args['compile_mode']}), "
        f"AdamW, median of {args['steps']} steps after a warm-up that compiles nothing; one process, in turn.",
        "",
        "| precision | B | experiment | eager ms | compiled ms | compiled / compiled vanilla | / fastest vanilla | "
        "eager GiB | compiled GiB | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(p, b, e) for p, b, e, _ in table}, key=lambda k: (k[0], -k[1], k[2] != "vanilla", k[2]))
    lines += [row(table, *key) for key in keys]
    exact = data.get("exact", {}).get("modes", {})
    if exact:
        lines += ["", "Compiled update vs upstream hooks (B=8, fp32 without TF32; required <= 1e-5):", ""]
        lines += [
            f"- {m}: {v['rel_err_vs_hooks']:.2e}, graph breaks {v['compile']['graph_breaks']}" for m, v in exact.items()
        ]
    lines += ["", f"`noisy`: the step times' p80/p20 exceeds {NOISY_SPREAD} (host-bound small batches)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json")
    print(render(read_check(Path(ap.parse_args().json))), end="")


def read_check(path: Path) -> dict:
    """compile_check.py's JSON, or ToolError naming the file."""
    fix = "give the JSON file compile_check.py wrote"
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ToolError(f"{path} cannot be read ({type(e).__name__}: {e})", fix) from None
    if not isinstance(data, dict) or not isinstance(data.get("time"), list):
        raise ToolError(f"{path} is not a compile_check.py result (no 'time' list)", fix)
    return data


if __name__ == "__main__":
    sys.exit(run_tool(Path(__file__).name, main))
