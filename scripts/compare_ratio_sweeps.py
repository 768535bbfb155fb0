"""Step-time ratio to vanilla, before vs after a change: two sweep folders, one table, a verdict (never imports torch).

    python scripts/compare_ratio_sweeps.py --before results/h200_xl2_margins_off --after results/h200_xl2_margins_on \\
        --markdown results/h200_xl2_margins_on/ratio_rise.md

Each folder holds records of one sweep (run_all_experiments.sh) with vanilla in it: every ratio is taken against
the vanilla of its own folder, setting and batch size, so drift between the two calls cancels. Exits 1 when an
experiment's ratio rises by more than --max-rise (default 0.01, issue 15's cost target), 2 on bad input.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from memory_test.cli_common.errors import run_tool  # noqa: E402
from memory_test.cli_common.files import atomic_write_text  # noqa: E402
from memory_test.diffusion_profile.plots.tables import SETTING_KEYS, add_vanilla_ratios, records_to_frames  # noqa: E402
from memory_test.records.io import load_records  # noqa: E402

KEYS = [*SETTING_KEYS, "experiment", "batch_size"]


def ratios(folder: str):
    runs, _ = records_to_frames(load_records(folder))
    if runs.empty:
        raise SystemExit(f"error: no run records in {folder}")
    runs = add_vanilla_ratios(runs)
    runs = runs[(runs["status"] == "ok") & (runs["experiment"] != "vanilla") & runs["time_x_vanilla"].notna()]
    return runs.set_index(KEYS)[["median_ms", "time_x_vanilla"]]


def compare(before: str, after: str, max_rise: float) -> tuple[str, bool]:
    joined = ratios(before).join(ratios(after), lsuffix="_before", rsuffix="_after", how="inner")
    if joined.empty:
        raise SystemExit("error: the two folders share no (setting, experiment, batch size) with a vanilla ratio")
    lines = [
        "| precision | experiment | batch | before ms (x vanilla) | after ms (x vanilla) | ratio rise | ok |",
        "|---|---|---|---|---|---|---|",
    ]
    ok_all = True
    for key, r in joined.iterrows():
        setting = dict(zip(KEYS, key))
        rise = r["time_x_vanilla_after"] - r["time_x_vanilla_before"]
        ok = rise <= max_rise
        ok_all &= ok
        lines.append(
            f"| {setting['precision']} | {setting['experiment']} | {setting['batch_size']} "
            f"| {r['median_ms_before']:.1f} ({r['time_x_vanilla_before']:.3f}) "
            f"| {r['median_ms_after']:.1f} ({r['time_x_vanilla_after']:.3f}) | {rise:+.3f} | {'yes' if ok else 'NO'} |"
        )
    return "\n".join(lines), ok_all


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="sweep folder before the change")
    ap.add_argument("--after", required=True, help="sweep folder after the change")
    ap.add_argument("--max-rise", type=float, default=0.01)
    ap.add_argument("--markdown", help="also write the table here")
    args = ap.parse_args(argv)
    for folder in (args.before, args.after):
        if not os.path.isdir(folder):
            ap.error(f"{folder} is not a folder of records")
    table, ok = compare(args.before, args.after, args.max_rise)
    text = f"Step time ratio to vanilla: {args.before} -> {args.after} (target: rise <= {args.max_rise})\n\n{table}\n"
    if args.markdown:
        atomic_write_text(args.markdown, text)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run_tool(Path(__file__).name, main))
