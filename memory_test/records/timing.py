"""Step-time statistics of a run: median, percentiles, throughput (standard library only)."""

from __future__ import annotations

import statistics

from memory_test.records.record import Timing


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) of an already sorted list."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(step_ms: list[float], samples_per_step: int, rows_per_sample: int = 1, **facts) -> Timing:
    """Median, p20, p80, mean, min, max of per-step times; samples/s and rows/s at the median; ``facts`` (method,
    warm-up and measured steps, wall time) as given."""
    values = sorted(step_ms)
    median = statistics.median(values)
    per_s = samples_per_step / (median / 1e3) if median > 0 else None
    return Timing(
        step_times_ms=[round(v, 4) for v in step_ms],
        median_ms=median,
        p20_ms=percentile(values, 0.2),
        p80_ms=percentile(values, 0.8),
        mean_ms=statistics.fmean(values),
        min_ms=values[0],
        max_ms=values[-1],
        samples_per_s=per_s,
        rows_per_s=per_s * rows_per_sample if per_s else None,
        **facts,
    )
