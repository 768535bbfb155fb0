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
itself under ``torchrun --standalone``; ``--batch-size`` is then the per-GPU batch. The work is done by
``memory_test.diffusion_profile.suite`` (flags, validation, measurement, max-batch search, launch).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python single_experiment.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from memory_test.cli_common.errors import run_tool  # noqa: E402
from memory_test.diffusion_profile.suite.flags import TOOL  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from memory_test.diffusion_profile.suite import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    return run_tool(TOOL, lambda: cli.run(argv, __doc__.split("\n\n")[0]))


if __name__ == "__main__":
    sys.exit(main())
