"""Torch-side measurement: phases of a step, host time, and a breakdown whose extra parts the caller supplies."""

from __future__ import annotations

import time

import torch

from memory_test.profiling.memory_breakdown import BASE_PARTS, REMAINDER, build_breakdown
from memory_test.profiling.tracker import MemoryTracker, StepTimer, extra_peak_bytes


def test_step_timer_splits_steps_into_phases_and_records_host_time():
    timer = StepTimer(torch.device("cpu"))
    for _ in range(3):
        with timer.step() as step:
            time.sleep(0.002)
            step.mark("first")
            time.sleep(0.004)
    totals = timer.finish()
    phases = timer.phase_ms()
    assert len(totals) == 3 and set(phases) == {"first", "rest"}
    for total, a, b in zip(totals, phases["first"], phases["rest"]):
        assert a >= 1.5 and b >= 3.5 and abs(total - a - b) < 1e-6
    assert len(timer.host_ms) == 3 and timer.wall_ms >= sum(totals)


def test_breakdown_takes_the_callers_parts_and_names_the_overlapping_ones():
    out = build_breakdown(1000, {"weights": 100, "gradients": 100, "optimizer_state": 200, "cache": 700}, ("cache",))
    assert list(out["parts_bytes"]) == [*BASE_PARTS, "cache", REMAINDER]
    assert out["parts_bytes"][REMAINDER] == -100 and sum(out["parts_bytes"].values()) == 1000
    assert out["overlapping"] == ["cache"] and "negative" in out["note"]
    plain = build_breakdown(None, {"weights": 1})
    assert plain["parts_bytes"][REMAINDER] is None and plain["not_available"] == ["gradients", "optimizer_state"]


def test_allocator_peaks_off_cuda_are_none_not_zero():
    tracker = MemoryTracker(torch.device("cpu"), sample=False)
    tracker.reset_peaks()
    assert tracker.peak_allocated_bytes() is None and extra_peak_bytes(lambda: None, torch.device("cpu")) is None
    assert tracker.result()["sampled_source"] == "process_rss"
