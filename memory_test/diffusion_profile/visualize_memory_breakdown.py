#!/usr/bin/env python3
"""Charts and a summary table from a folder of single_experiment.py records (never imports torch).

    python memory_test/diffusion_profile/visualize_memory_breakdown.py --results-dir results/diffusion_profile

Writes into ``<results-dir>/plots`` (or ``--out-dir``), one set per setting (device, model, image size, precision,
noise multiplicity, attention): memory breakdown at the peak (a grid of batch sizes), peak memory vs batch size,
step time and throughput vs batch size, the memory-time trade-off, max batch per mode, each DP mode's ratio to
vanilla (noisy timings hollow); the cost of noise multiplicity K where records cover several K at one batch size;
multi-GPU scaling where they cover several world sizes; plus ``summary.md``. Records measured on different devices
never share a chart. OOM records are drawn as OOM; corrupt or foreign JSON files are skipped with a warning. The
work is done by ``memory_test.diffusion_profile.plots``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import matplotlib

matplotlib.use("Agg")

from memory_test.cli_common.errors import ToolArgumentParser, ToolError, run_tool  # noqa: E402
from memory_test.cli_common.files import output_path_problem  # noqa: E402

TOOL = "visualize_memory_breakdown.py"
EXIT_SKIPPED = 3  # charts and summary written, but some files or charts were left out (each named in a warning)
EPILOG = (
    "Exit codes: 0 every record drawn; 3 charts and summary.md written, but some files were skipped (corrupt, "
    "foreign, or a field of the wrong type) or a chart could not be drawn, each named in a warning and in "
    "summary.md; 2 bad input, a folder without JSON records included (nothing written); 1 unexpected failure "
    "(MEMORY_TEST_DEBUG=1 shows the traceback)."
)


def main(argv: list[str] | None = None) -> int:
    return run_tool(TOOL, lambda: _draw(argv))


def _check_output_folder(out_dir: Path) -> None:
    why = output_path_problem(out_dir / "summary.md")
    if why:
        raise ToolError(f"--out-dir {out_dir}: {why}", "choose a folder you can write (--out-dir)")


def _output_folder(out_dir: Path) -> Path:
    """The charts' folder, created if needed; ToolError (before anything is deleted or drawn) if it cannot be."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ToolError(f"--out-dir {out_dir} cannot be created ({e.strerror})", "choose another --out-dir") from None
    return out_dir


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
    out_dir = Path(args.out_dir) if args.out_dir else results / "plots"
    _check_output_folder(out_dir)
    if next(results.rglob("*.json"), None) is None:  # a mistyped folder: say so, and leave its old charts alone
        raise ToolError(f"--results-dir {results} holds no JSON records", "give the folder of a sweep's records")
    _output_folder(out_dir)
    from memory_test.diffusion_profile.plots.draw import draw_all

    drawing = draw_all(results, out_dir)
    skipped = f"; skipped {len(drawing.skipped)}" if drawing.skipped else ""
    print(f"wrote {len(drawing.written)} chart(s) and {out_dir / 'summary.md'}{skipped}")
    return EXIT_SKIPPED if drawing.skipped else 0


if __name__ == "__main__":
    sys.exit(main())
