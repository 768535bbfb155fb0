"""single_experiment.py --find-max-batch: doubling then bisection, each probe a fresh process.

``search_max_batch`` is the search itself (any ``probe(batch) -> "ok" | "oom"``); ``Prober`` runs one probe as a
fresh ``single_experiment`` process and keeps the largest batch that fitted; ``find_max_batch`` turns a search into
a ``max_batch`` record (its timing, memory and model are those of the largest probe that fitted).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from memory_test.diffusion_profile.suite.exit_codes import EXIT_ERROR, EXIT_OK, EXIT_OOM
from memory_test.diffusion_profile.suite.flags import to_argv
from memory_test.diffusion_profile.suite.launch import ENTRY_MODULE, REPO_ROOT, child_env
from memory_test.diffusion_profile.suite.privacy_block import privacy_block
from memory_test.diffusion_profile.suite.run import base_record, environment_block
from memory_test.records.io import load_record
from memory_test.records.record import MaxBatchResult, Probe, Record, RunConfig

# Flags a probe sets itself (batch, iterations, output) or never passes on (a search, an allocator snapshot).
NOT_PASSED_TO_PROBES = (
    "--batch-size", "--num-iter", "--warmup-iter", "--output", "--memory-snapshot", "--find-max-batch",
    "--max-batch-start", "--max-batch-limit", "--max-batch-resolution", "--probe-num-iter", "--probe-warmup-iter",
    "--probe-timeout",
)  # fmt: skip


def search_max_batch(
    probe, start: int, limit: int, resolution: int = 1, bracket: tuple[int, int] | None = None
) -> tuple[int, int | None, bool]:
    """Largest batch for which ``probe(b)`` is "ok": double from ``start`` until a failure or ``limit``, then bisect.

    ``probe`` returns "ok" or "oom" (raise to abort). A known (ok, oom) ``bracket`` replaces the doubling. Returns
    (max_ok (0 if none), smallest oom seen or None, whether the limit was reached without an oom).
    """
    if bracket is not None:
        ok, bad = bracket
        return _bisect(probe, ok, bad, resolution)
    ok, b = 0, min(start, limit)
    while probe(b) == "ok":
        ok = b
        if b >= limit:
            return ok, None, True
        b = min(2 * b, limit)
    return _bisect(probe, ok, b, resolution)


def _bisect(probe, ok: int, bad: int, resolution: int) -> tuple[int, int | None, bool]:
    while bad - ok > resolution:
        mid = (ok + bad) // 2
        if probe(mid) == "ok":
            ok = mid
        else:
            bad = mid
    return ok, bad, False


class ProbeFailed(RuntimeError):
    pass


class Prober:
    """Runs probes as fresh processes into a hidden folder beside the output; keeps every probe and the best."""

    def __init__(self, config: RunConfig):
        self.config, self.search = config, config.find_max_batch
        out = Path(config.output)
        self.folder = out.parent / f".{out.name}.probes"
        self.probes: list[Probe] = []
        self.best: Record | None = None

    def __call__(self, b: int) -> str:
        path = self.folder / f"bs{b}.json"
        print(f"[find-max-batch] {self.config.experiment}: probing batch {b} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        code, tail = self._run(b, path)
        rec, why = load_record(path) if path.exists() else (None, "no record written")
        probe = _probe(b, code, round(time.perf_counter() - t0, 2), rec, f"{why}; stderr tail: {' | '.join(tail)}")
        self.probes.append(probe)
        print(f"[find-max-batch]   batch {b}: {probe.status}", file=sys.stderr, flush=True)
        if probe.status == "ok" and (self.best is None or b > self.best.config.batch_size):
            self.best = rec
        if probe.status in ("ok", "oom"):
            return probe.status
        raise ProbeFailed(f"probe at batch {b} failed: {probe.message}")

    def _run(self, b: int, path: Path) -> tuple[int | None, list[str]]:
        cmd = [sys.executable, "-m", ENTRY_MODULE, *to_argv(self.config, skip=NOT_PASSED_TO_PROBES)]
        cmd += ["--batch-size", str(b), "--num-iter", str(self.search.probe_num_iter)]
        cmd += ["--warmup-iter", str(self.search.probe_warmup_iter), "--output", str(path)]
        timeout = self.search.probe_timeout_s
        try:
            r = subprocess.run(cmd, cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout)
            return r.returncode, (r.stderr or "").strip().splitlines()[-5:]
        except subprocess.TimeoutExpired:
            return None, [f"probe timed out after {timeout}s"]


def _probe(b: int, code: int | None, wall_s: float, rec: Record | None, no_record: str) -> Probe:
    if rec is None:
        return Probe(batch_size=b, exit_code=code, wall_s=wall_s, status="error", message=no_record)
    mem, timing = rec.memory, rec.timing
    return Probe(
        batch_size=b,
        exit_code=code,
        wall_s=wall_s,
        status=rec.status,
        message=rec.message,
        peak_allocated_bytes=mem.peak_allocated_bytes if mem else None,
        total_bytes=mem.total_bytes if mem else None,
        median_ms=timing.median_ms if timing else None,
        samples_per_s=timing.samples_per_s if timing else None,
    )


def find_max_batch(config: RunConfig, device) -> tuple[Record, int]:
    """Run the search ``config.find_max_batch`` describes; the max_batch record and its exit code."""
    t0 = time.perf_counter()
    search = config.find_max_batch
    prober = Prober(config)
    prober.folder.mkdir(parents=True, exist_ok=True)
    rec = base_record(config, environment_block(device), record_type="max_batch")
    bracket = (search.bracket["ok_batch_size"], search.bracket["oom_batch_size"]) if search.bracket else None
    try:
        max_ok, first_oom, at_limit = search_max_batch(prober, search.start, search.limit, search.resolution, bracket)
        rec, code = _searched(rec, max_ok, first_oom, at_limit)
    except ProbeFailed as e:
        rec, code = (
            rec.replace(status="error", message=str(e), max_batch=MaxBatchResult(limit_reached=False)),
            EXIT_ERROR,
        )
    finally:
        shutil.rmtree(prober.folder, ignore_errors=True)
    rec = rec.replace(max_batch=rec.max_batch.replace(probes=prober.probes))
    rec = _with_best_probe(rec, prober.best) if prober.best else _bracket_answer(rec)
    return rec.replace(exit_code=code, duration_s=time.perf_counter() - t0), code


def _searched(rec: Record, max_ok: int, first_oom: int | None, at_limit: bool) -> tuple[Record, int]:
    result = MaxBatchResult(max_batch_size=max_ok, first_oom_batch_size=first_oom, limit_reached=at_limit)
    if max_ok == 0:
        return rec.replace(
            status="oom", message=f"even batch {first_oom} ran out of memory", max_batch=result
        ), EXIT_OOM
    return rec.replace(status="ok", max_batch=result), EXIT_OK


def _with_best_probe(rec: Record, best: Record) -> Record:
    """The largest probe that fitted: its batch, model, timing, memory and backends (few iterations)."""
    search = rec.config.find_max_batch
    config = rec.config.replace(
        batch_size=best.config.batch_size,
        rows_per_step=best.config.rows_per_step,
        global_batch_size=best.config.global_batch_size,
        num_iter=search.probe_num_iter,
        warmup_iter=search.probe_warmup_iter,
    )
    return rec.replace(
        config=config,
        privacy=privacy_block(config),
        model=best.model,
        peak_memory_mb=best.peak_memory_mb,
        avg_time_ms=best.avg_time_ms,
        timing=best.timing,
        memory=best.memory,
        backends=best.backends,
        experiment_notes=best.experiment_notes,
        distributed=best.distributed,  # a probe over N > 1 processes
    )


def _bracket_answer(rec: Record) -> Record:
    """Every probe ran out of memory but the bracket's ok batch did run: that batch is the answer."""
    if rec.status != "ok":
        return rec
    b = rec.max_batch.max_batch_size
    cfg = rec.config
    config = cfg.replace(
        batch_size=b, rows_per_step=b * cfg.noise_multiplicity, global_batch_size=b * cfg.nproc_per_node
    )
    return rec.replace(config=config, privacy=privacy_block(config))
