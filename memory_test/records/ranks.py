"""One record from the ranks of a multi-process run: global step times and per-rank peaks (standard library only).

Every rank measures its own steps and peaks (``RankResult``); the suite gathers them (``all_gather_object``) and
rank 0 combines them here. A step's global time is the maximum over ranks of each rank's own time for that step
(FSDP2's collectives keep the ranks in step, so the slowest rank sets the pace); the statistics are taken over
those maxima.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from memory_test.records.record import Distributed, Timing
from memory_test.records.timing import summarize


@dataclass(frozen=True)
class RankResult:
    """What one rank measured."""

    step_ms: list[float]
    peak_allocated_bytes: int | None
    total_bytes: int | None
    final_mean_loss: float


@dataclass(frozen=True)
class RunShape:
    world_size: int
    backend: str
    sharded: bool
    per_rank_batch: int
    noise_multiplicity: int
    peak_source: str


def combine(ranks: list[RankResult], rank0_timing: Timing, shape: RunShape) -> tuple[Timing, Distributed]:
    """(global timing, the ``distributed`` block) from every rank's results, rank 0's first."""
    per_step = [max(times) for times in zip(*(r.step_ms for r in ranks))]
    global_batch = shape.per_rank_batch * shape.world_size
    timing = summarize(
        per_step,
        global_batch,
        shape.noise_multiplicity,
        method=rank0_timing.method,
        warmup_steps=rank0_timing.warmup_steps,
        measured_steps=rank0_timing.measured_steps,
        measured_wall_ms=rank0_timing.measured_wall_ms,
        step_time_reduction="per step, the max over ranks of each rank's own step time",
        rank0_step_times_ms=ranks[0].step_ms,
    )
    peaks = [r.total_bytes for r in ranks]
    known = [p for p in peaks if p is not None]
    block = Distributed(
        world_size=shape.world_size,
        backend=shape.backend,
        fsdp2_sharded=shape.sharded,
        per_gpu_batch_size=shape.per_rank_batch,
        global_batch_size=global_batch,
        per_rank_peak_allocated_bytes=[r.peak_allocated_bytes for r in ranks],
        per_rank_peak_bytes=peaks,
        peak_bytes_max=max(known) if known else None,
        peak_bytes_mean=sum(known) / len(known) if known else None,
        peak_source=shape.peak_source,
        per_rank_median_step_ms=[statistics.median(r.step_ms) if r.step_ms else None for r in ranks],
        global_samples_per_s=timing.samples_per_s,
        per_rank_final_mean_loss=[r.final_mean_loss for r in ranks],
    )
    return timing, block
