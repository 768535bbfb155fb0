"""A run's outcome as a record: the base record, a measured run or its failure (oom / error), the console line."""

from __future__ import annotations

import os
import sys
import time
import traceback

from memory_test.diffusion_profile.suite.exit_codes import EXIT_ERROR, EXIT_OK, EXIT_OOM
from memory_test.diffusion_profile.suite.measure import INJECT_OOM_ENV, Measured, Partial, measure
from memory_test.diffusion_profile.suite.privacy_block import privacy_block
from memory_test.records.record import SCHEMA_NAME, SCHEMA_VERSION, Env, Memory, Record, RunConfig

# What allocators say when memory runs out: CUDA (caching allocator, cuBLAS, cuDNN) and the CPU allocator.
OOM_MESSAGES = (
    "out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "DefaultCPUAllocator: can't allocate memory",
    "DefaultCPUAllocator: not enough memory",
)


def is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m.lower() in str(exc).lower() for m in OOM_MESSAGES)


def environment_block(device) -> Env:
    from memory_test.profiling.environment import environment

    env = environment(device)
    if os.environ.get(INJECT_OOM_ENV) is not None:
        env["fault_injection"] = {INJECT_OOM_ENV: os.environ[INJECT_OOM_ENV]}
    return Env.from_dict(env)


def base_record(config: RunConfig, env: Env, record_type: str = "run") -> Record:
    return Record(
        schema=SCHEMA_NAME,
        schema_version=SCHEMA_VERSION,
        record_type=record_type,
        experiment=config.experiment,
        status="ok",
        config=config,
        privacy=privacy_block(config),
        env=env,
    )


def with_measurement(rec: Record, m: Measured) -> Record:
    total = m.memory.total_bytes
    if m.distributed is not None and m.distributed.peak_bytes_max is not None:
        total = m.distributed.peak_bytes_max  # legacy MiB: the largest rank (memory.* is rank 0's)
    privacy = rec.privacy
    if privacy is not None:
        privacy = privacy.replace(norm_error_margin=m.norm_error_margin)
    return rec.replace(
        peak_memory_mb=total / 2**20 if total is not None else None,
        avg_time_ms=m.timing.mean_ms,
        timing=m.timing,
        memory=m.memory,
        backends=m.backends,
        loss=m.loss,
        memory_snapshot=m.snapshot,
        distributed=m.distributed,
        privacy=privacy,
        compile=m.compile,
    )


def with_failure(rec: Record, exc: Exception, partial: Partial) -> tuple[Record, int]:
    oom = is_oom(exc)
    memory = None
    if partial.tracker is not None:
        try:
            memory = Memory(at_failure=partial.tracker.result())
        except Exception:  # the counters are a courtesy: the failure itself is what the record says
            memory = None
    rec = rec.replace(
        status="oom" if oom else "error",
        message=f"{type(exc).__name__}: {exc}".strip()[:4000],
        traceback_tail=None if oom else traceback.format_exc().splitlines()[-25:],
        memory=memory,
    )
    return rec, EXIT_OOM if oom else EXIT_ERROR


def run_and_record(config: RunConfig, device, dist=None) -> tuple[Record, int]:
    """Measure one configuration; any failure becomes an oom or error record. Returns (record, exit code)."""
    t0 = time.perf_counter()
    rec = base_record(config, environment_block(device))
    partial = Partial()
    try:
        rec, code = with_measurement(rec, measure(config, device, partial, dist)), EXIT_OK
    except Exception as exc:
        rec, code = with_failure(rec, exc, partial)
    rec = rec.replace(
        model=rec.model or partial.model,
        experiment_notes=rec.experiment_notes or partial.notes,
        exit_code=code,
        duration_s=time.perf_counter() - t0,
    )
    return rec, code


def report(rec: Record) -> None:
    """One console line about a written record."""
    cfg = rec.config
    summary = f"{cfg.experiment} batch={cfg.batch_size} {cfg.precision} {cfg.device}"
    if cfg.nproc_per_node > 1:
        summary += f" x{cfg.nproc_per_node} processes"
    if rec.status == "ok" and rec.record_type == "max_batch":
        print(f"{summary}: max batch {rec.max_batch.max_batch_size} -> {cfg.output}")
    elif rec.status == "ok":
        peak = rec.memory.total_bytes
        peak_s = f"{peak / 2**20:.1f} MiB" if peak is not None else "n/a"
        print(f"{summary}: peak {peak_s}, median step {rec.timing.median_ms:.2f} ms{_distributed(rec)} -> {cfg.output}")
    else:
        print(f"{summary}: {rec.status.upper()}: {rec.message} -> {cfg.output}", file=sys.stderr)


def _distributed(rec: Record) -> str:
    d = rec.distributed
    if d is None or d.peak_bytes_max is None:
        return ""
    return (
        f" | {d.world_size} ranks ({d.backend}), global batch {d.global_batch_size}, "
        f"peak max {d.peak_bytes_max / 2**20:.1f} MiB mean {d.peak_bytes_mean / 2**20:.1f} MiB, "
        f"{d.global_samples_per_s:.1f} samples/s"
    )
