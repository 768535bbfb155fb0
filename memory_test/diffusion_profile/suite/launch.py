"""Multi-process runs of ``single_experiment.py``, the launching side: torchrun on itself, one record at the end.

``single_experiment.py --nproc-per-node N`` (N > 1) starts ``torchrun --standalone --nproc-per-node=N`` on the same
flags; each process is one rank (``worker.py``). ``--batch-size B`` is the per-GPU batch; the global batch is N·B
(the DP data loader, hence the noise scale and the sampling rate of the reported ε, use N·B). Step time: for every
measured step, the maximum over ranks of each rank's own step time; memory: each rank's peak, gathered by rank 0,
which writes the record (``records.ranks``).

Failures: a rank whose run fails writes its own record into a folder named here; torchrun then stops the others and
this process writes one ``oom`` (if any rank ran out of memory) or ``error`` record for the whole run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from memory_test.diffusion_profile.suite.exit_codes import EXIT_ERROR, EXIT_OK
from memory_test.diffusion_profile.suite.run import base_record, environment_block, report
from memory_test.diffusion_profile.suite.worker import RANK_DIR_ENV
from memory_test.records.io import load_record, write_record_atomic
from memory_test.records.record import Distributed, Record, RunConfig

REPO_ROOT = Path(__file__).resolve().parents[3]
ENTRY_MODULE = "memory_test.diffusion_profile.single_experiment"


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", ENTRY_MODULE, *argv]  # fmt: skip


def child_env() -> dict:
    """This environment with the repository first on PYTHONPATH (a child imports this checkout, not another)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))


def launch(argv: list[str], config: RunConfig, device) -> int:
    """Run torchrun on ``argv`` (the same flags: workers see LOCAL_RANK) and make sure one record results."""
    nproc, out = config.nproc_per_node, Path(config.output)
    rank_dir = out.parent / f".{out.name}.ranks"
    shutil.rmtree(rank_dir, ignore_errors=True)
    rank_dir.mkdir(parents=True)
    env = child_env()
    env[RANK_DIR_ENV] = str(rank_dir)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    started = time.time_ns()
    print(f"launching torchrun: {nproc} processes ({config.device})", file=sys.stderr, flush=True)
    proc = subprocess.Popen(torchrun_command(nproc, argv), env=env, start_new_session=True)
    try:
        rc = proc.wait()
    except BaseException:  # Ctrl-C / SIGTERM: stop torchrun and every worker (its own process group)
        _stop_group(proc)
        shutil.rmtree(rank_dir, ignore_errors=True)
        raise
    failed = _rank_failures(rank_dir)
    shutil.rmtree(rank_dir, ignore_errors=True)
    fresh = out.exists() and out.stat().st_mtime_ns >= started
    rec, _ = load_record(out) if fresh else (None, None)
    if rec is not None and rec.status == "ok" and not failed:
        return EXIT_OK
    rec = _one_failure(failed, nproc) if failed else _no_result(config, device, rc)
    write_record_atomic(out, rec)
    report(rec)
    return rec.exit_code


def _rank_failures(rank_dir: Path) -> list[Record]:
    found = [load_record(p)[0] for p in sorted(rank_dir.glob("rank*.json"))]
    return [r for r in found if r is not None]


def _one_failure(failed: list[Record], nproc: int) -> Record:
    """The record of the whole run: an out-of-memory rank first, then the lowest rank."""
    failed = sorted(failed, key=lambda r: (r.status != "oom", r.distributed.failed_rank))
    first = failed[0]
    return first.replace(
        message=f"rank {first.distributed.failed_rank} of {nproc}: {first.message}",
        distributed=Distributed(
            world_size=nproc,
            backend=first.distributed.backend,
            failed_ranks=[r.distributed.failed_rank for r in failed],
        ),
    )


def _no_result(config: RunConfig, device, rc: int) -> Record:
    return base_record(config, environment_block(device)).replace(
        status="error",
        exit_code=EXIT_ERROR,
        message=f"torchrun exited with code {rc} and no rank wrote a result (see its output above)",
        distributed=Distributed(world_size=config.nproc_per_node, failed_ranks=None),
    )


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
