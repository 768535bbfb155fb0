"""Step timing and memory peaks for one process, the same for every training mode.

- ``StepTimer``: per-step wall time from CUDA events recorded around each step on the current stream (on CPU,
  ``time.perf_counter``). No host synchronisation happens inside a step; ``finish()`` synchronises once.
- ``MemoryTracker``: torch allocator peaks (allocated, reserved) reset after warm-up, plus a ``PeakSampler``
  thread that samples device-wide used memory through NVML (nvidia-ml-py) or, on CPU, the process' RSS.
- ``memory_snapshot``: records allocator history for https://pytorch.org/memory_viz.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time

import torch

from memory_test.cli_common.files import atomic_path


class StepTimer:
    """Times steps with CUDA events (GPU) or perf_counter (CPU); read results after ``finish()``."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._events: list[tuple] = []
        self._cpu_ms: list[float] = []
        self._wall_start = None
        self.wall_ms = None

    @contextlib.contextmanager
    def step(self):
        if self._wall_start is None:
            self._wall_start = time.perf_counter()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._cpu_ms.append((time.perf_counter() - t0) * 1e3)

    def finish(self) -> list[float]:
        """Synchronise once and return the per-step times in ms."""
        if self.cuda:
            torch.cuda.synchronize()
        if self._wall_start is not None:
            self.wall_ms = (time.perf_counter() - self._wall_start) * 1e3
        if self.cuda:
            return [s.elapsed_time(e) for s, e in self._events]
        return list(self._cpu_ms)


def _percentile(sorted_vals: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) of an already sorted list."""
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = (len(sorted_vals) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def timing_summary(step_ms: list[float], samples_per_step: int) -> dict:
    """Median, p20, p80, mean, min, max of per-step times and samples/s at the median."""
    vals = sorted(step_ms)
    median = statistics.median(vals)
    return {
        "step_times_ms": [round(v, 4) for v in step_ms],
        "median_ms": median,
        "p20_ms": _percentile(vals, 0.2),
        "p80_ms": _percentile(vals, 0.8),
        "mean_ms": statistics.fmean(vals),
        "min_ms": vals[0],
        "max_ms": vals[-1],
        "samples_per_s": samples_per_step / (median / 1e3) if median > 0 else None,
    }


# ----- sampled peaks ------------------------------------------------------------------------------------------


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _nvml_handle(device_index: int):
    """NVML handle of torch's CUDA device ``device_index`` (matched by PCI bus id, so CUDA_VISIBLE_DEVICES works)."""
    import pynvml

    pynvml.nvmlInit()
    props = torch.cuda.get_device_properties(device_index)
    bus = getattr(props, "pci_bus_id", None)
    if bus is not None:
        pci = f"{getattr(props, 'pci_domain_id', 0):08x}:{bus:02x}:{getattr(props, 'pci_device_id', 0):02x}.0"
        with contextlib.suppress(pynvml.NVMLError):
            return pynvml.nvmlDeviceGetHandleByPciBusId(pci)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if device_index < len(ids) and ids[device_index].isdigit():
            return pynvml.nvmlDeviceGetHandleByIndex(int(ids[device_index]))
    return pynvml.nvmlDeviceGetHandleByIndex(device_index)


class PeakSampler:
    """Background thread sampling a memory counter every ``interval_s``; keeps the max since the last reset.

    On CUDA the counter is NVML's device-wide used memory (CUDA context, allocator cache and other processes
    included); on CPU it is this process' resident set size. Sampling can miss short spikes.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.source = None
        self.error = None
        self._read = None
        if device.type == "cuda":
            try:
                import pynvml

                handle = _nvml_handle(device.index if device.index is not None else torch.cuda.current_device())
                self._read = lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
                self.source = "nvml_device_used"
            except Exception as e:  # no NVML (e.g. some containers): report it, measure the rest
                self.error = f"NVML unavailable: {e}"
        elif _rss_bytes() is not None:
            self._read = _rss_bytes
            self.source = "process_rss"
        self.baseline = self._safe_read()
        self.peak = self.baseline
        self.samples = 0
        self._stop = threading.Event()
        self._thread = None

    def _safe_read(self):
        if self._read is None:
            return None
        try:
            return self._read()
        except Exception as e:
            self.error = f"sampling failed: {e}"
            self._read = None
            return None

    def _loop(self):
        while not self._stop.is_set():
            v = self._safe_read()
            if v is None:
                return
            self.samples += 1
            if self.peak is None or v > self.peak:
                self.peak = v
            self._stop.wait(self.interval_s)

    def start(self):
        if self._read is not None and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="peak-sampler", daemon=True)
            self._thread.start()
        return self

    def reset(self):
        self.peak = self._safe_read()
        self.samples = 0

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None
        v = self._safe_read()  # one last sample so a run shorter than the interval still has a value
        if v is not None and (self.peak is None or v > self.peak):
            self.peak = v
        return self


class MemoryTracker:
    """Allocator peaks (reset after warm-up) plus the sampled device/process peak."""

    def __init__(self, device: torch.device, sample_interval_s: float = 0.005):
        self.device = device
        self.cuda = device.type == "cuda"
        self.sampler = PeakSampler(device, sample_interval_s).start()

    def reset_peaks(self):
        """Call after warm-up: every peak from here on covers the measured steps only."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.sampler.reset()

    def allocated_now(self) -> int | None:
        return torch.cuda.memory_allocated(self.device) if self.cuda else None

    def result(self) -> dict:
        self.sampler.stop()
        out = {
            "peak_allocated_bytes": None,
            "peak_reserved_bytes": None,
            "sampled_peak_bytes": self.sampler.peak,
            "sampled_baseline_bytes": self.sampler.baseline,
            "sampled_source": self.sampler.source,
            "sampled_count": self.sampler.samples,
            "sampler_interval_s": self.sampler.interval_s,
        }
        if self.sampler.error:
            out["sampler_error"] = self.sampler.error
        if self.cuda:
            out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
            out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
            out["allocated_end_bytes"] = torch.cuda.memory_allocated(self.device)
            out["reserved_end_bytes"] = torch.cuda.memory_reserved(self.device)
            stats = torch.cuda.memory_stats(self.device)
            out["num_alloc_retries"] = stats.get("num_alloc_retries", 0)
            out["num_ooms"] = stats.get("num_ooms", 0)
        return out


@contextlib.contextmanager
def memory_snapshot(path: str | None, device: torch.device, max_entries: int = 200_000):
    """Record CUDA allocator history while the block runs and dump it to ``path`` (a pickle for memory_viz).

    Yields a dict that says whether a snapshot was written (it is not on CPU, or without a path).
    """
    info = {"requested_path": path, "written": False}
    if not path:
        yield info
        return
    if device.type != "cuda":
        info["reason"] = "memory snapshots record the CUDA caching allocator; this run is on CPU"
        yield info
        return
    torch.cuda.memory._record_memory_history(max_entries=max_entries)
    try:
        yield info
    finally:
        try:
            with atomic_path(path) as tmp:  # creates missing folders; the umask's mode, never a half-written pickle
                torch.cuda.memory._dump_snapshot(str(tmp))
            info["written"] = True
        except Exception as e:
            info["reason"] = f"dump failed: {e}"
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
