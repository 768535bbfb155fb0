"""single_experiment.py's work: parse and validate, then one of: a record without a run (the sweep's), one rank of
a torchrun launch, a max-batch search, a torchrun launch, or one measured run."""

from __future__ import annotations

import os
import signal
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path

from memory_test.cli_common.errors import ToolError
from memory_test.cli_common.folder_lock import writing_into
from memory_test.diffusion_profile.suite import distributed_rules as rules
from memory_test.diffusion_profile.suite.exit_codes import EXIT_OK
from memory_test.diffusion_profile.suite.flags import build_parser
from memory_test.diffusion_profile.suite.launch import launch
from memory_test.diffusion_profile.suite.max_batch import find_max_batch
from memory_test.diffusion_profile.suite.run import base_record, environment_block, report, run_and_record
from memory_test.diffusion_profile.suite.validate import validate
from memory_test.diffusion_profile.suite.worker import RANK_DIR_ENV, run_worker
from memory_test.records.io import write_record_atomic
from memory_test.records.record import MaxBatchResult


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run(argv: list[str], description: str) -> int:
    """Exit codes: suite.exit_codes (0 ok, 1 error record, 2 bad input or a folder a sweep holds, 3 oom record)."""
    warnings.filterwarnings("ignore", message="Secure RNG turned off")  # the benchmark seeds its noise on purpose
    signal.signal(signal.SIGTERM, _terminate)  # unwind like Ctrl-C: no record, probe processes killed
    args = build_parser(description).parse_args(argv)
    config, device, notices = validate(args)
    for notice in notices:
        print(f"note: {notice}", file=sys.stderr)
    launched = rules.is_worker() and RANK_DIR_ENV in os.environ  # a rank of our own launch: the launcher holds it
    with nullcontext() if launched else writing_into(Path(config.output).parent, "--output"):
        return _run(args, argv, config, device)


def _run(args, argv: list[str], config, device) -> int:
    """The work, in the record's folder (held against a sweep, or the sweep's own)."""
    if args.record_only:
        return record_without_run(config, device, args.record_only, args.record_message)
    if rules.is_worker():  # one rank of a torchrun launch (started below, by the parent process)
        if config.find_max_batch is not None:
            raise ToolError("--find-max-batch runs in the launching process", "run it without torchrun")
        return run_worker(config, device)
    if config.find_max_batch is not None:
        rec, code = find_max_batch(config, device)
    elif config.nproc_per_node > 1:
        return launch(argv, config, device)
    else:
        rec, code = run_and_record(config, device)
    write_record_atomic(config.output, rec)
    report(rec)
    return code


def record_without_run(config, device, status: str, message: str | None) -> int:
    """The sweep's "skipped" or "error" record for a configuration it did not run (or that died without one)."""
    record_type = "max_batch" if config.find_max_batch is not None else "run"
    rec = base_record(config, environment_block(device), record_type=record_type).replace(
        status=status,
        message=message or f"recorded as {status} without running",
        recorded_by="sweep",
        max_batch=MaxBatchResult() if record_type == "max_batch" else None,
    )
    write_record_atomic(config.output, rec)
    return EXIT_OK
