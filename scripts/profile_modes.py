"""Where the time and memory of each mode go on DiT-XL/2: phase split, kernel categories, BK cache, profiler tables.

    python scripts/profile_modes.py --batch-size 128 --precision fp32 --modes vanilla,flash_clip_bk --out-dir $OUT
    python scripts/profile_modes.py --batch-size 8 --precision bf16 --compile default --host-profile --out-dir $OUT

For each mode, in one process (a same-run comparison): 3 warm-up steps, 6 timed steps (median; the suite's
StepTimer marks forward / backward / optimizer with CUDA events; `host_issue`: host time until the step's work is
issued, which approaches the step time when the step is bound by Python and launches, as at small batches), one
step under torch.profiler whose CUDA kernels are summed by category. Peaks from the suite's MemoryTracker; the
engine's cache peak, norm paths and kernel backend from its public stats().

``--compile MODE``: the suite's regional compile (DP modes through ``dp_model.compile``), warmed up until a step
compiles nothing. ``--host-profile``: one more step under cProfile (host work only: where Python spends a
host-bound step), its top functions written beside the kernel table.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from memory_test.cli_common.arg_types import positive_int  # noqa: E402
from memory_test.cli_common.devices import require_cuda  # noqa: E402
from memory_test.cli_common.errors import run_tool  # noqa: E402
from memory_test.diffusion.objective import NoiseSchedule, make_noisy_batch  # noqa: E402
from memory_test.diffusion_profile.suite.experiments import EXPERIMENTS, RunContext  # noqa: E402
from memory_test.diffusion_profile.suite.flags import COMPILE_MODES  # noqa: E402
from memory_test.models.dit_huggingface_wrapper import DiTHuggingFaceWrapper  # noqa: E402
from memory_test.privacy.compiled import compile_regions  # noqa: E402
from memory_test.profiling.compile_stats import compile_stats  # noqa: E402
from memory_test.profiling.tracker import MemoryTracker, StepTimer  # noqa: E402

# Substrings of CUDA kernel names -> category; first match wins.
CATEGORIES = (
    ("norm_kernels", ("gram_kernel", "direct_kernel", "flash_norm", "sq_norm")),
    ("attention", ("flash", "fmha", "attention", "cudnn")),
    ("gemm", ("gemm", "cutlass", "xmma", "sm90", "sm80", "cublas", "matmul")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "copy", "fill")),
    ("reduce", ("reduce", "norm")),
)


def categorize(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def build(args, device):
    with torch.device(device):  # init on the GPU: CPU init of 750M parameters costs seconds per process
        model = DiTHuggingFaceWrapper(model_name=args.model, pretrained=False, use_flash_attention=True).train()
    return model


def run_mode(name, args, device, x0, labels):
    torch.manual_seed(0)
    model = build(args, device)
    ctx = RunContext(
        device=device,
        batch_size=args.batch_size,
        noise_multiplicity=args.noise_multiplicity,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        optimizer="adamw",
        lr=1e-4,
        seed=0,
    )
    prepared = EXPERIMENTS[name].prepare(model, ctx)
    compile_run(args.compile, prepared, model)
    net, opt, loss_fn = prepared.model, prepared.optimizer, prepared.loss_fn
    schedule = NoiseSchedule()
    schedule.alphas_cumprod = schedule.alphas_cumprod.to(device)
    gen = torch.Generator(device=device).manual_seed(2)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step(marks=None):
        x_t, t, y, eps = make_noisy_batch(x0, labels, args.noise_multiplicity, generator=gen, schedule=schedule)
        if marks:
            marks.mark("noise")
        with amp:
            pred = net(x_t, t, y)
        loss = loss_fn(pred, eps)
        if marks:
            marks.mark("forward")
        loss.backward()
        if marks:
            marks.mark("backward")
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    warm = warm_up(step, compiled=args.compile != "off")
    warm_s = time.perf_counter() - t0
    tracker = MemoryTracker(device, sample=False)
    tracker.reset_peaks()
    if prepared.engine is not None:
        prepared.engine.reset_peaks()
    timer = StepTimer(device)
    for _ in range(6):
        with timer.step() as marks:
            step(marks)
    timer.finish()
    phases = timer.phase_ms()
    phases["optimizer"] = phases.pop("rest")
    phases["step"] = [f + b + o for f, b, o in zip(phases["forward"], phases["backward"], phases["optimizer"])]
    # Host time to issue the step's work; close to the GPU step time means the step is host-bound.
    phases["host_issue"] = timer.host_ms
    del phases["noise"]
    peak = tracker.peak_allocated_bytes()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        step()
        torch.cuda.synchronize()
    cats, kernels = {}, {}
    for evt in prof.key_averages():
        dev_us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
        if dev_us and evt.device_type == torch.autograd.DeviceType.CUDA:
            cats[categorize(evt.key)] = cats.get(categorize(evt.key), 0.0) + dev_us / 1e3
            kernels[evt.key] = dev_us / 1e3
    host_top = host_profile(step, name, args) if args.host_profile else None
    peaks_by_phase = phase_peaks(step, net)
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=90)
    tag = f"{name}_{args.precision}_b{args.batch_size}_c{args.compile}"
    with open(os.path.join(args.out_dir, f"profile_{tag}.txt"), "w") as f:
        f.write(table)
    stats = prepared.engine.stats() if prepared.engine is not None else None  # this package's engine only
    result = {
        "phases_ms_median": {k: statistics.median(v) for k, v in phases.items()},
        "peak_allocated_bytes": peak,
        "dp_cache_peak_bytes": stats.cache_peak_bytes if stats else None,
        "gpu_kernel_ms_by_category": cats,
        "gpu_kernel_ms_total": sum(cats.values()),
        "top_kernels_ms": dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:12]),
        "norm_path_counts": stats.norm_path_counts if stats else {},
        "kernel_backend": stats.kernel_backend if stats else None,
        "attention_backend": model.attention_backend,
        "peak_allocated_bytes_by_phase": peaks_by_phase,
        "warmup_steps": warm,
        "warmup_s": warm_s,
        "host_profile_top": host_top,
    }
    return result


def compile_run(mode: str, prepared, model) -> None:
    """The suite's compile: repeated blocks, DP modes through the engine (exact sink recording)."""
    if mode == "off":
        return
    kwargs = {} if mode == "default" else {"mode": mode}
    if prepared.engine is not None:
        prepared.engine.compile(regional=True, **kwargs)
    else:
        compile_regions(model, regional=True, **kwargs)


def warm_up(step, *, compiled: bool) -> int:
    """3 steps; compiled: on until a step after the compiling ones compiles nothing (at most 12)."""
    steps, seen_compile = 0, False
    while steps < 12:
        before = compile_stats()
        step()
        torch.cuda.synchronize()
        steps += 1
        now = compile_stats().since(before)
        seen_compile |= bool(now.graphs or now.recompiles)
        if steps >= 3 and (not compiled or (seen_compile and not (now.graphs or now.recompiles))):
            break
    return steps


class _PhasePeaks:
    """The allocator's peak within each phase of one step: reset at every boundary, read at the next."""

    def __init__(self):
        self.peaks: dict[str, int] = {}

    def mark(self, phase_that_ended: str) -> None:
        self.peaks[phase_that_ended] = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()


def phase_peaks(step, net) -> dict[str, int]:
    """One more step with a peak per phase (bytes): batch, forward, backward (a DP model's split at its clipped
    gradients: "backward and norms", then "clipped gradients"), optimizer. Says where the step's peak is reached."""
    marks = _PhasePeaks()
    inner = getattr(net, "write_clipped_grads", None)
    if inner is not None:  # an instance attribute shadows the method for this step only

        def clipped(*a, **k):
            marks.mark("backward and norms")
            return inner(*a, **k)

        net.__dict__["write_clipped_grads"] = clipped
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    names = {"noise": "batch", "forward": "forward", "backward": "clipped gradients" if inner else "backward"}
    try:
        step(_Renamed(marks, names))
        marks.mark("optimizer")
    finally:
        net.__dict__.pop("write_clipped_grads", None)
    return marks.peaks


class _Renamed:
    """The step's marks under the names ``phase_peaks`` reports."""

    def __init__(self, marks, names: dict):
        self.marks, self.names = marks, names

    def mark(self, name: str) -> None:
        self.marks.mark(self.names[name])


def host_profile(step, name: str, args, top: int = 40) -> list:
    """One step under cProfile: the functions with the most own host time (written in full beside the table)."""
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    prof.enable()
    step()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    tag = f"{name}_{args.precision}_b{args.batch_size}_c{args.compile}"
    with open(os.path.join(args.out_dir, f"host_{tag}.txt"), "w") as f:
        f.write(text.getvalue())
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]  # (file, line, fn) -> (cc, nc, tt, ct, ...)
    return [
        {
            "fn": f"{fn[2]} ({os.path.basename(fn[0])}:{fn[1]})",
            "calls": v[1],
            "self_ms": v[2] * 1e3,
            "cum_ms": v[3] * 1e3,
        }
        for fn, v in rows
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="DiT-XL/2")
    ap.add_argument("--batch-size", type=positive_int, default=128)
    ap.add_argument("--noise-multiplicity", type=positive_int, default=1)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--modes", default="vanilla,bookkeeping,flash_clip_bk")
    ap.add_argument("--compile", choices=COMPILE_MODES, default="off", help="regional torch.compile, as the suite")
    ap.add_argument("--host-profile", action="store_true", help="also one step under cProfile (host time)")
    ap.add_argument("--out-dir", required=True)
    args = ap.parse_args()
    require_cuda(Path(__file__).name)
    os.makedirs(args.out_dir, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 means TF32 matmuls, as DiT trains
    torch.backends.cudnn.allow_tf32 = True
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(1)
    x0 = torch.randn(args.batch_size, 4, 32, 32, device=device, generator=gen)
    labels = torch.randint(0, 1000, (args.batch_size,), device=device, generator=gen)
    results = {}
    for name in args.modes.split(","):
        t0 = time.time()
        try:
            results[name] = run_mode(name, args, device, x0, labels)
            torch.cuda.empty_cache()
        except torch.cuda.OutOfMemoryError as e:
            results[name] = {"status": "oom", "message": str(e).splitlines()[0]}
            torch.cuda.empty_cache()
        results[name]["wall_s"] = time.time() - t0
        print(name, json.dumps(results[name].get("phases_ms_median", results[name])), flush=True)
    record = {
        "config": vars(args),
        "env": {
            "gpu": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "modes": results,
    }
    tag = f"{args.precision}_b{args.batch_size}_k{args.noise_multiplicity}_c{args.compile}"
    path = os.path.join(args.out_dir, f"profile_{tag}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)
    base = results.get("vanilla", {}).get("phases_ms_median", {}).get("step")
    peak0 = results.get("vanilla", {}).get("peak_allocated_bytes")
    print(
        f"{'mode':16s} {'step':>8s} {'fwd':>7s} {'bwd':>7s} {'opt':>6s} {'host':>7s} {'gpu':>7s} {'x van':>6s} "
        f"{'peak GiB':>9s} {'x van':>6s}"
    )
    for name, r in results.items():
        if "phases_ms_median" not in r:
            print(f"{name:16s} {r.get('status')}")
            continue
        ph = r["phases_ms_median"]
        ratio_t = ph["step"] / base if base else float("nan")
        ratio_m = r["peak_allocated_bytes"] / peak0 if peak0 else float("nan")
        print(
            f"{name:16s} {ph['step']:8.1f} {ph['forward']:7.1f} {ph['backward']:7.1f} {ph['optimizer']:6.1f} "
            f"{ph['host_issue']:7.1f} {r['gpu_kernel_ms_total']:7.1f} {ratio_t:6.3f} "
            f"{r['peak_allocated_bytes'] / 2**30:9.2f} {ratio_m:6.3f}"
        )


if __name__ == "__main__":
    sys.exit(run_tool(Path(__file__).name, main))
