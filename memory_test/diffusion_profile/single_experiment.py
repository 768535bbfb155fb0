#!/usr/bin/env python3
"""Profile one DiT training configuration (vanilla, upstream Opacus or an engine DP mode) and write one JSON record.

Each run is its own process: a fixed synthetic batch (seeded VAE-sized latents and labels; fresh t and noise each
step, DiT's epsilon objective), ``--warmup-iter`` steps, then the peak counters are reset and ``--num-iter`` steps
are timed with CUDA events (perf_counter on CPU). The record (schema: docs/RESULTS_SCHEMA.md) is written atomically.

Exit codes: 0 ok, 1 the run failed (an "error" record was written), 2 bad input (nothing written), 3 out of memory
(an "oom" record was written).

Examples:
    python -m memory_test.diffusion_profile.single_experiment --experiment bookkeeping --batch-size 32 \\
        --output results/bk_32.json
    python memory_test/diffusion_profile/single_experiment.py --experiment vanilla --find-max-batch --output max.json
    # 2 GPUs, FSDP2 (torchrun is started here): per-GPU batch 16, global batch 32
    python -m memory_test.diffusion_profile.single_experiment --experiment ghost_fsdp_bk --nproc-per-node 2 \\
        --batch-size 16 --output results/ghost_fsdp_bk_w2.json

With ``--nproc-per-node N`` > 1 (sharded modes, and ``vanilla`` as a plain FSDP2 baseline) the run re-launches
itself under ``torchrun --standalone``; ``--batch-size`` is then the per-GPU batch (see distributed_launch.py).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python single_experiment.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from memory_test.cli_common.errors import ToolError, run_tool  # noqa: E402
from memory_test.diffusion_profile import distributed_launch as dl  # noqa: E402
from memory_test.diffusion_profile.max_batch_search import (  # noqa: E402,F401  (re-exported: tests, sweep)
    ProbeFailed,
    config_to_argv,
    find_max_batch,
    search_max_batch,
)
from memory_test.diffusion_profile.run_config import (  # noqa: E402,F401
    ACCOUNTANTS,
    IMAGENET_TRAIN_SIZE,
    INJECT_OOM_ENV,
    OPTIMIZER_NAMES,
    PRECISIONS,
    REPO_ROOT,
    UsageError,
    build_parser,
    parse_bracket,
    privacy_block,
    resolve_device,
    validate,
)
from memory_test.diffusion_profile.run_measure import _env, base_record, measure, run_and_record  # noqa: E402,F401
from memory_test.profiling import records

# ----- entry point --------------------------------------------------------------------------------------------

TOOL = "single_experiment.py"


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_tool(TOOL, lambda: _run(argv))


def _run(argv: list[str]) -> int:
    import warnings

    warnings.filterwarnings("ignore", message="Secure RNG turned off")  # the benchmark seeds its noise on purpose
    signal.signal(signal.SIGTERM, _terminate)  # unwind like Ctrl-C: no record, probe processes killed
    from memory_test.diffusion_profile.experiments import experiment_names

    parser = build_parser(experiment_names())
    args = parser.parse_args(argv)
    try:
        config, device, notices = validate(args)
    except UsageError as e:
        raise ToolError(str(e), None if " — " in str(e) else f"see `{TOOL} --help`") from None
    for n in notices:
        print(f"note: {n}", file=sys.stderr)

    if args.record_only:
        rec = base_record(config, _env(device), record_type="max_batch" if args.find_max_batch else "run")
        if args.find_max_batch:
            rec["max_batch"] = {"max_batch_size": None, "first_oom_batch_size": None, "probes": []}
        message = args.record_message or f"recorded as {args.record_only} without running"
        rec.update(status=args.record_only, message=message, exit_code=None, recorded_by="sweep")
        records.write_record_atomic(args.output, rec)
        return records.EXIT_OK
    if dl.is_worker():  # one rank of a torchrun launch (started below, by the parent process)
        if args.find_max_batch:
            raise ToolError("--find-max-batch runs in the launching process", "run it without torchrun")
        return dl.run_worker(config, device, report)
    if args.find_max_batch:
        rec, code = find_max_batch(config, device, args)
    elif args.nproc_per_node > 1:
        return dl.launch(argv, config, device, report)
    else:
        rec, code = run_and_record(config, device)
    records.write_record_atomic(args.output, rec)
    report(rec, config)
    return code


def report(rec: dict, config: dict) -> None:
    """One console line about a written record."""
    summary = f"{config['experiment']} batch={rec['config']['batch_size']} {config['precision']} {config['device']}"
    if config.get("nproc_per_node", 1) > 1:
        summary += f" x{config['nproc_per_node']} processes"
    out = config["output"]
    if rec["status"] == "ok" and rec["record_type"] == "max_batch":
        print(f"{summary}: max batch {rec['max_batch']['max_batch_size']} -> {out}")
    elif rec["status"] == "ok":
        t, m = rec["timing"], rec["memory"]
        peak = m.get("total_bytes")
        peak_s = f"{peak / 2**20:.1f} MiB" if peak is not None else "n/a"
        print(f"{summary}: peak {peak_s}, median step {t['median_ms']:.2f} ms{dl.describe(rec)} -> {out}")
    else:
        print(f"{summary}: {rec['status'].upper()}: {rec['message']} -> {out}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
