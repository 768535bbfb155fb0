"""Step timing and memory peaks for one process, the same for every training mode and every script.

- ``StepTimer``: per-step wall time from CUDA events recorded around each step on the current stream (on CPU,
  ``time.perf_counter``), optionally split into phases, plus each step's host time. No host synchronisation
  happens inside a step; ``finish()`` synchronises once.
- ``MemoryTracker``: torch allocator peaks (allocated, reserved) reset after warm-up, plus a ``PeakSampler``
  thread that samples device-wide used memory through NVML (nvidia-ml-py) or, on CPU, the process' RSS.
- ``extra_peak_bytes``: what one call allocates at its peak beyond its inputs (kernel benchmarks).
- ``memory_snapshot``: records allocator history for https://pytorch.org/memory_viz.

Statistics of the times (median, percentiles) are arithmetic on plain lists: ``memory_test.records.timing``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import torch

from memory_test.cli_common.files import atomic_path


class StepTimer:
    """Times steps with CUDA events (GPU) or perf_counter (CPU); read the results after ``finish()``.

    ``with timer.step() as step:`` brackets one step; ``step.mark("forward")`` inside it ends a phase, so that
    ``phase_ms()`` splits every step (the part after the last mark is "rest"). ``host_ms`` holds each step's host
    time, until its work was issued: on a GPU it approaches the step time when the step is bound by Python and
    kernel launches rather than by the GPU.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._steps: list[_Marks] = []
        self._wall_start = None
        self.wall_ms = None
        self.host_ms: list[float] = []

    @contextlib.contextmanager
    def step(self):
        if self._wall_start is None:
            self._wall_start = time.perf_counter()
        marks = _Marks(self.cuda)
        t0 = time.perf_counter()
        marks.mark("start")
        yield marks
        marks.mark("end")
        self.host_ms.append((time.perf_counter() - t0) * 1e3)
        self._steps.append(marks)

    def finish(self) -> list[float]:
        """Synchronise once and return the per-step times in ms."""
        if self.cuda:
            torch.cuda.synchronize()
        if self._wall_start is not None:
            self.wall_ms = (time.perf_counter() - self._wall_start) * 1e3
        return [m.elapsed(0, len(m.points) - 1) for m in self._steps]

    def phase_ms(self) -> dict[str, list[float]]:
        """Phase name -> each step's time from the previous mark to that mark, in ms (after ``finish()``)."""
        phases: dict[str, list[float]] = {}
        for m in self._steps:
            names = [name for name, _ in m.points[1:-1]] + ["rest"]
            for i, name in enumerate(names):
                phases.setdefault(name, []).append(m.elapsed(i, i + 1))
        return phases


class _Marks:
    """The time points of one step: CUDA events recorded on the current stream, or perf_counter readings."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.points: list[tuple[str, object]] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.points.append((name, event))
        else:
            self.points.append((name, time.perf_counter()))

    def elapsed(self, i: int, j: int) -> float:
        a, b = self.points[i][1], self.points[j][1]
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


def extra_peak_bytes(fn, device: torch.device) -> int | None:
    """Peak bytes allocated during one call of ``fn`` beyond what was allocated before it (None off CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


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
    """Allocator peaks (reset after warm-up) plus the sampled device/process peak.

    ``sample=False`` skips the sampling thread (scripts that need only the allocator's peak).
    """

    def __init__(self, device: torch.device, sample_interval_s: float = 0.005, sample: bool = True):
        self.device = device
        self.cuda = device.type == "cuda"
        self.sampler = PeakSampler(device, sample_interval_s)
        if sample:
            self.sampler.start()

    def reset_peaks(self):
        """Call after warm-up: every peak from here on covers the measured steps only."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.sampler.reset()

    def allocated_now(self) -> int | None:
        return torch.cuda.memory_allocated(self.device) if self.cuda else None

    def peak_allocated_bytes(self) -> int | None:
        """``torch.cuda.max_memory_allocated`` since the last ``reset_peaks()`` (None off CUDA)."""
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None

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
